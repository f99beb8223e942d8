"""The hosted skeleton (backends/hosted.py) through a third, toy provider added the way any
provider is: one adapter class (``Toy`` below, over a job API unlike OpenAI's or Together's)
and one registry entry. Its SDK is the real openai SDK used as a plain HTTP client (it is
generated from the same template as together's), over the one fault-injecting transport
(``transport.py``) with a world that plays the toy API. Nothing patches the skeleton or the
SDK."""
from __future__ import annotations

import json

import httpx2
import openai
import pytest
from transport import Fault, Transport

from semievol import cost, load_backend
from semievol.backends import registry
from semievol.backends.hosted import (LOCAL_API_KEY, Event, HostedBackend, Job, Plan,
                                      TrainingStats, jsonl)
from semievol.cli import main
from semievol.config import FinetuneConfig
from semievol.demo import make_task
from semievol.errors import BackendError, BudgetExceeded, ConfigError, FinetuneFailed
from semievol.types import Generation

SECRET = "toy-secret-key-DO-NOT-LEAK"


# -- the whole of a new provider: an adapter and a registry entry -------------------------

class Toy:
    """The toy API as a Provider: files, named trainings listed by tag, a training log."""

    name, title, key_env = "toy", "Toy", "TOY_API_KEY"
    sdk, sdk_error = openai, openai.OpenAIError
    default_model, default_embed_model = "toy-base", "toy-embed"
    min_finetune_examples = 1
    prices = cost.PriceList("Toy", "2026-12", {
        "toy-base": cost.Price(input=1.0, output=2.0, training=10.0),
        "ft:toy-base": cost.Price(input=2.0, output=4.0), "toy-embed": cost.Price(input=0.1)})
    embed_limits = (100, 10_000)
    succeeded, failed = "ready", frozenset({"broken"})
    output_field = "output"

    def connect(self, *, base_url, http_client, **options):
        return openai.OpenAI(base_url=base_url or "http://toy.invalid/v1", **options,
                             http_client=http_client or WORLD.transport.client())

    def batches(self, backend):
        return None

    def prepare(self, backend, base, examples, config, *, epochs, key) -> Plan:
        tokens = [cost.count_chat_tokens(ex, base) for ex in examples]
        return Plan(jsonl({"messages": list(ex)} for ex in examples),
                    TrainingStats(len(examples), sum(tokens), max(tokens)), _root(base),
                    {"base": base, "epochs": epochs, "tag": key})

    def upload(self, backend, name, data) -> str:
        return backend.client.post("/toy/files", cast_to=object,
                                   body={"name": name, "content": data.decode()})["id"]

    def create(self, backend, plan, record) -> Job:
        return _job(backend.client.post("/toy/trainings", cast_to=object,
                                        body={"file": record["file_id"], **plan.request}))

    def retrieve(self, backend, job_id) -> Job:
        return _job(backend.client.get(f"/toy/trainings/{job_id}", cast_to=object))

    def find(self, backend, key) -> list[Job]:
        listed = backend.client.get("/toy/trainings", cast_to=object,
                                    options={"params": {"tag": key}})
        return [_job(t) for t in listed["items"]]

    def events(self, backend, job_id) -> list[Event]:
        log = backend.client.get(f"/toy/trainings/{job_id}/log", cast_to=object)
        return [Event(line["n"], line["text"], line["step"], line["of"], line["error"])
                for line in log["lines"]]

    def chat_body(self, model, messages, *, n, temperature, max_tokens, seed) -> dict:
        return {"model": model, "messages": [dict(m) for m in messages], "n": n,
                "temperature": temperature, "max_tokens": max_tokens, "logprobs": True}

    def generation(self, choice, model) -> Generation:
        content = choice.logprobs.content
        return Generation(choice.message.content, tuple(t.token for t in content),
                          tuple(t.logprob for t in content))

    def embed_body(self, model, texts) -> dict:
        return {"model": model, "input": texts}


def _root(model: str) -> str:
    return model.split(":")[1] if model.startswith("toy:") else model


def _job(t: dict) -> Job:
    return Job(t["name"], t["state"], t["made"], t["file"], t["created"], base=t["base"],
               root=_root(t["base"]), trained_tokens=t["tokens"], error=t.get("why"))


ENTRY = registry.hosted("toy", __name__, "Toy", help="a toy API (tests)")


# -- the toy API ----------------------------------------------------------------------------

class World:
    """The toy API in memory. A training is ``queued``, then ``training``, then ``ready``
    (or ``outcome``) on its ``polls``-th look (None: never). Faults go in
    ``transport.fault``, on paths without the ``/v1``."""

    def __init__(self):
        self.files: dict[str, str] = {}
        self.trainings: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.polls: int | None = 2
        self.outcome = "ready"
        self.transport = Transport(self, httpx2, route=lambda path: path.removeprefix("/v1"))

    def created(self) -> int:
        return sum(1 for r in self.requests if r == ("POST", "/toy/trainings"))

    def __call__(self, request: httpx2.Request) -> dict:
        method, path = request.method, request.url.path.removeprefix("/v1")
        self.requests.append((method, path))
        body = json.loads(request.content) if request.content else {}
        return self.answer(method, path, body, request)

    def answer(self, method, path, body, request):
        if (method, path) == ("POST", "/toy/files"):
            self.files[f"f{len(self.files) + 1}"] = body["content"]
            return {"id": f"f{len(self.files)}"}
        if (method, path) == ("POST", "/toy/trainings"):
            name = f"t{len(self.trainings) + 1}"
            self.trainings[name] = {"name": name, "state": "queued", "made": None, "tokens": 0,
                                    "created": len(self.trainings), "looks": 0, **body}
            return self.trainings[name]
        if (method, path) == ("GET", "/toy/trainings"):
            tag = request.url.params.get("tag")
            return {"items": [t for t in self.trainings.values() if t["tag"] == tag]}
        if method == "GET" and path.endswith("/log"):
            looks = self.trainings[path.split("/")[-2]]["looks"]
            return {"lines": [{"n": i, "text": f"step {i}", "step": i, "of": self.polls,
                               "error": False} for i in range(1, looks + 1)]}
        if method == "GET" and path.startswith("/toy/trainings/"):
            return self.look(self.trainings[path.split("/")[-1]])
        if path == "/chat/completions":
            return completion(body)
        if path == "/embeddings":
            return {"object": "list", "model": body["model"],
                    "data": [{"object": "embedding", "index": i,
                              "embedding": [float(len(t)), 1.0, float(i % 3)]}
                             for i, t in enumerate(body["input"])],
                    "usage": {"prompt_tokens": len(body["input"]),
                              "total_tokens": len(body["input"])}}
        raise AssertionError(f"unexpected {method} {path}")

    def look(self, training: dict) -> dict:
        training["looks"] += 1
        if training["state"] in ("ready", "broken"):
            pass
        elif self.polls is not None and training["looks"] >= self.polls:
            training["state"] = self.outcome
            if self.outcome == "ready":
                training.update(made=f"toy:{_root(training['base'])}:{training['name']}",
                                tokens=1000)
            else:
                training["why"] = "loss went to NaN"
        else:
            training["state"] = "training"
        return training


def completion(body: dict) -> dict:
    choices = []
    for i in range(body["n"]):
        tokens = ["Answer", ":", " A"]
        choices.append({"index": i, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "".join(tokens)},
                        "logprobs": {"content": [{"token": t, "logprob": -0.1 * (i + 1) * j,
                                                  "bytes": None, "top_logprobs": []}
                                                 for j, t in enumerate(tokens)]}})
    return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": choices,
            "usage": {"prompt_tokens": 10, "completion_tokens": 3 * len(choices),
                      "total_tokens": 10 + 3 * len(choices)}}


WORLD = World()


@pytest.fixture
def world(monkeypatch):
    """A fresh toy API, and the toy provider registered for the test's length."""
    global WORLD
    WORLD = World()
    registry.register(ENTRY)
    monkeypatch.setenv("TOY_API_KEY", SECRET)
    yield WORLD
    registry.BACKENDS.pop("toy")


def toy(workdir, **options) -> HostedBackend:
    return load_backend("toy", workdir=workdir, poll_interval=0.01, max_retries=0, quiet=True,
                        **options)


def examples(count=4):
    return [[{"role": "user", "content": f"Printer {i} is jammed."},
             {"role": "assistant", "content": "Answer: A"}] for i in range(count)]


# -- the claims -------------------------------------------------------------------------------

def test_a_new_provider_is_one_adapter_and_one_registry_entry(world, tmp_path, capsys):
    """Registered, the toy runs the whole pipeline from the command line (two fine-tunes,
    generation, retrieval), priced from its own list, and the dry run prices it too."""
    world.polls = 1        # trained at the first look (the CLI polls at 5 s, not the toy's)
    data = make_task(tmp_path / "data")
    flags = ["run", "--data", str(data), "--backend", "toy", "--limit-unlabeled", "16",
             "--limit-test", "8", "--quiet"]
    assert main([*flags, "--dry-run"]) == 0
    assert "Toy list prices as of 2026-12" in capsys.readouterr().out
    assert main([*flags, "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["backend"] == "toy" and results["config"]["backend"] == "toy"
    assert results["models"]["warm"].startswith("toy:toy-base:")
    assert results["usage"]["trained_tokens"] >= 1000 and results["usage"]["cost_usd"] > 0
    assert world.created() == len(world.trainings) >= 1
    written = [p.read_text() for p in (tmp_path / "run").rglob("*.json*")]
    assert written and not any(SECRET in text for text in written)


def test_create_or_find_never_pays_twice_after_a_crash(world, tmp_path):
    """The API creates the job but the answer never arrives (as if the process died before
    recording the job id): the rerun finds the job by its key and creates no second one;
    nor does a rerun whose record is lost, or one after giving up waiting."""
    world.transport.fault = lambda method, path, nth: (  # the answer is lost
        Fault(500, error={"message": "x"}, after=True)
        if (method, path) == ("POST", "/toy/trainings") else None)
    with pytest.raises(BackendError, match="creating the fine-tuning job: HTTP 500.*run again"):
        toy(tmp_path).finetune("toy-base", examples(), FinetuneConfig(), key="run/warm-up")
    record = json.loads(next((tmp_path / "jobs").glob("*.json")).read_text())
    assert record["file_id"] and not record.get("job_id")     # uploaded, job id unknown
    world.transport.fault, world.polls = None, None           # now it trains for ever
    with pytest.raises(BackendError, match="still training.*run again to resume"):
        toy(tmp_path, max_wait=0.1).finetune("toy-base", examples(), FinetuneConfig(),
                                             key="run/warm-up")
    world.polls = 1
    model = toy(tmp_path).finetune("toy-base", examples(), FinetuneConfig(), key="run/warm-up")
    elsewhere = toy(tmp_path / "lost").finetune("toy-base", examples(), FinetuneConfig(),
                                                 key="run/warm-up")
    assert model == elsewhere == "toy:toy-base:t1"
    assert world.created() == 1 and len(world.files) == 1
    assert model.usage.trained_tokens == 1000
    assert model.usage.cost_usd == pytest.approx(1000 * 10.0 / 1e6)   # the toy's list


def test_evolve_continues_and_is_priced_as_the_root_model(world, tmp_path):
    backend = toy(tmp_path)
    warm = backend.finetune("toy-base", examples(), FinetuneConfig(), key="warm")
    evolved = backend.finetune(warm, examples(6), FinetuneConfig(), key="evolve")
    assert world.trainings["t2"]["base"] == warm and evolved == "toy:toy-base:t2"
    out = backend.generate_with_logprobs(evolved, [[{"role": "user", "content": "q"}]], n=3)
    assert [g.text for g in out[0]] == ["Answer: A"] * 3
    assert out.usage.cost_usd == pytest.approx((10 * 2.0 + 9 * 4.0) / 1e6)   # ft:toy-base


def test_failed_job_budget_and_keys(world, tmp_path, monkeypatch):
    world.outcome = "broken"
    with pytest.raises(FinetuneFailed, match="t1 broken: loss went to NaN"):
        toy(tmp_path).finetune("toy-base", examples(), FinetuneConfig(), key="k")
    world.outcome = "ready"                     # a rerun after a failure is a new attempt
    assert toy(tmp_path).finetune("toy-base", examples(), FinetuneConfig(), key="k") == \
        "toy:toy-base:t2"
    uploads = len(world.files)
    with pytest.raises(BudgetExceeded, match="fine-tuning toy-base"):
        toy(tmp_path, max_cost_usd=1e-9).finetune("toy-base", examples(), FinetuneConfig(),
                                                   key="dear")
    assert len(world.files) == uploads          # stopped before the upload
    with pytest.raises(ConfigError, match="whole number of epochs"):
        toy(tmp_path).finetune("toy-base", examples(), FinetuneConfig(epochs=0.5), key="e")
    with pytest.raises(ConfigError, match="no batch API"):
        toy(tmp_path, batch_mode=True)
    monkeypatch.delenv("TOY_API_KEY")
    with pytest.raises(ConfigError, match="no Toy API key: set TOY_API_KEY"):
        toy(tmp_path)
    assert toy(tmp_path, base_url="http://127.0.0.1:9/v1").client.api_key == LOCAL_API_KEY


@pytest.mark.parametrize("status, expected", [
    (401, "refused the API key \\(HTTP 401\\): .*\\*\\*\\*.*Set TOY_API_KEY"),
    (403, "refused the API key \\(HTTP 403\\)"),
    (429, "rate-limited or out of quota"),
    (500, "HTTP 500 from http://toy.invalid/v1/: .*run again to resume"),
    (400, "HTTP 400 from http://toy.invalid/v1/: bad request .*\\*\\*\\*$"),
])
def test_sdk_errors_are_translated_in_one_place(world, tmp_path, status, expected):
    world.transport.fault = lambda method, path, nth: Fault(
        status, error={"message": f"bad request {SECRET}"})
    with pytest.raises(BackendError, match=expected) as e:
        toy(tmp_path).embed(["a"])
    assert SECRET not in str(e.value) and str(e.value).startswith("embedding with toy-embed")


def test_unreachable_and_slow_servers(world, tmp_path):
    world.transport.fault = lambda method, path, nth: Fault(drop=True)
    with pytest.raises(BackendError, match="could not reach .*run again to resume"):
        toy(tmp_path).embed(["a"])
    world.transport.fault = lambda method, path, nth: Fault(delay=60)
    with pytest.raises(BackendError, match="did not answer within 0.5 s"):
        toy(tmp_path, timeout=0.5).embed(["a"])


def test_the_registry_is_the_one_list(world):
    from semievol.cli import _parser

    args = _parser().parse_args(["run", "--data", "d", "--backend", "toy"])
    assert args.backend == "toy"                      # the CLI's choices read the registry
    assert _parser().parse_args(["serve", "--backend", "fake"]).backend == "fake"
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--backend", "toy"])   # serve serves local backends
    with pytest.raises(ConfigError, match="unknown backend 'nope': choose hf, openai"):
        load_backend("nope")
    assert registry.entry("toy").recipe == "paper" and registry.entry("hf").recipe == "small"
