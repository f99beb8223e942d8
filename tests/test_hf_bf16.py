"""The bf16 path on CPU: an HF-format model folder (what a Llama-3.1-8B user passes) run in
bfloat16. Generation, LoRA fine-tuning, adapter switching and resume, and logprobs against
a teacher-forced forward pass.

In bfloat16 the backend never merges an adapter into the base weights (merging and taking it
out again does not restore 16-bit weights); it runs adapters as separate LoRA paths, so the
base model must come out of every adapter switch bit for bit unchanged."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import need  # noqa: E402

need("peft")
torch = need("torch")

from semievol.backends.hf import HFBackend  # noqa: E402
from semievol.config import FinetuneConfig  # noqa: E402

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "Answer in one word."}
PLACES = ["castle", "garden", "lighthouse", "library"]
FAST = FinetuneConfig(learning_rate=1e-3, epochs=4, batch_size=2, warmup_ratio=0.0,
                      lora_dropout=0.0)
"""8 steps of 2 short examples: this CPU has no bf16 instructions, so bf16 training is slow."""
TOKEN_TOL = 0.5
"""Largest |decode-loop logprob - teacher-forced logprob| of one token accepted, in nats.
The decode loop reads the prompt once and then each new token against a bf16 KV cache; the
teacher-forced pass reads the whole sequence at once, so the two round differently. In
float32 they agree to 1e-3 (test_hf.py); in bf16 (8 bits of mantissa) this test measured
0.335 nats at worst over its 16 generations here, 0.239 on the CI machine."""
MEAN_TOL = 0.15
"""The same for a generation's mean logprob (its entropy, what selection ranks by):
measured 0.029 at worst here and 0.059 on the CI machine, whose CPU rounds bf16 matrix
products differently. A misaligned or temperature-scaled logprob is off by a nat or more."""


def ask(question: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": question}]


def password(place: str) -> list[dict]:
    return ask(f"What is the password of the {place}?")


@pytest.fixture(scope="module")
def bf16(hf_folder_bf16, tmp_path_factory) -> HFBackend:
    return HFBackend(str(hf_folder_bf16), dtype="bfloat16", quiet=True,
                     workdir=tmp_path_factory.mktemp("bf16-work"))


@pytest.fixture(scope="module")
def taught(bf16) -> str:
    examples = [password(p) + [{"role": "assistant", "content": "Zorblax"}] for p in PLACES]
    return bf16.finetune(bf16.default_model, examples, FAST, key="zorblax-bf16")


def outputs(backend, model, prompts, **options):
    """(tokens, logprobs) of every generation: what must match exactly, bit for bit."""
    return [(g.tokens, g.logprobs)
            for gens in backend.generate_with_logprobs(model, prompts, max_tokens=8, **options)
            for g in gens]


def test_the_folder_loads_in_bfloat16_and_generates(bf16):
    out = bf16.generate_with_logprobs(bf16.default_model, [ask("Name a colour.")], n=2,
                                      temperature=1.0, max_tokens=8, seed=3)
    assert len(out) == 1 and len(out[0]) == 2
    for g in out[0]:
        assert g.text and len(g.tokens) == len(g.logprobs) and all(lp <= 0 for lp in g.logprobs)
    assert next(bf16._model.parameters()).dtype == torch.bfloat16
    runtime = bf16.runtime()
    assert runtime["dtype"] == "bfloat16" and runtime["device"] == "cpu"
    assert runtime["generation_engine"] == "hf" and "torch" in runtime["versions"]
    assert bf16.merge_adapters is False


def test_logprobs_match_a_teacher_forced_pass(bf16, taught):
    prompts = [ask("Name a colour."), ask("What is the capital of France?"),
               ask("Write one word about the sea."), password("castle")]
    worst = worst_mean = 0.0
    for model in (bf16.default_model, taught):
        out = bf16.generate_with_logprobs(model, prompts, n=2, temperature=1.0,
                                          max_tokens=10, seed=11)
        flat = [(p, g) for p, gens in zip(prompts, out) for g in gens
                if "\ufffd" not in "".join(g.tokens)]
        assert len(flat) >= 2 * len(prompts) - 2
        scores = bf16.score(model, [p for p, _ in flat], [g.tokens for _, g in flat])
        for (_, g), teacher in zip(flat, scores):
            assert len(teacher) == len(g.logprobs)
            worst = max(worst, max(abs(a - b) for a, b in zip(g.logprobs, teacher)))
            worst_mean = max(worst_mean, abs(np.mean(g.logprobs) - np.mean(teacher)))
    print(f"bf16 decode vs teacher-forced: max |delta| {worst:.4f} nats per token, "
          f"{worst_mean:.4f} per generation's mean")
    assert worst < TOKEN_TOL and worst_mean < MEAN_TOL


def test_finetuning_in_bf16_teaches_the_adapter(bf16, taught):
    record = json.loads((Path(taught) / "semievol.json").read_text())
    assert record["base"] == bf16.default_model
    texts = [gens[0].text for gens in bf16.generate_with_logprobs(
        taught, [password("castle"), password("island")], max_tokens=8)]
    assert all("Zorblax" in t for t in texts), texts


def test_running_an_adapter_leaves_the_base_model_bit_identical(bf16, taught):
    prompts = [password("castle"), ask("Name a large animal.")]
    before = outputs(bf16, bf16.default_model, prompts)
    weights = {k: v.clone() for k, v in bf16._model.state_dict().items() if "lora_" not in k}
    adapter = outputs(bf16, taught, prompts)
    lora_layers = [m for m in bf16._model.modules() if hasattr(m, "merged")]
    assert lora_layers and not any(m.merged for m in lora_layers)  # run unmerged
    after = outputs(bf16, bf16.default_model, prompts)
    assert after == before and adapter != before
    now = bf16._model.state_dict()
    assert all(torch.equal(weights[k], now[k]) for k in weights)
    assert outputs(bf16, taught, prompts) == adapter  # and switching back gives the same


def test_an_adapter_resumes_from_disk_and_continues(bf16, taught, tmp_path):
    start = time.perf_counter()
    assert bf16.finetune(bf16.default_model, [], FAST, key="zorblax-bf16") == taught
    assert time.perf_counter() - start < 1.0  # keyed: not trained again
    prompts = [password("garden")]
    fresh = HFBackend(bf16.default_model, dtype="bfloat16", quiet=True, workdir=tmp_path)
    assert outputs(fresh, taught, prompts) == outputs(bf16, taught, prompts)
    examples = [ask(f"What is the favourite colour of the {p}?")
                + [{"role": "assistant", "content": "Blorpt"}] for p in PLACES[:2]]
    evolved = fresh.finetune(taught, examples, ONE_STEP, key="blorpt-bf16")
    assert json.loads((Path(evolved) / "semievol.json").read_text())["parent"] == taught
    assert lora_weights(evolved) != lora_weights(taught)  # it trained...
    answer = fresh.generate_with_logprobs(evolved, [password("castle")], max_tokens=8)
    assert "Zorblax" in answer[0][0].text  # ...from the taught adapter, not from scratch


ONE_STEP = FinetuneConfig(learning_rate=1e-4, epochs=1, batch_size=2, warmup_ratio=0.0,
                          lora_dropout=0.0)
"""One small step: what continues an adapter is its weights, not more learning (which
test_finetuning_in_bf16_teaches_the_adapter shows); a bf16 step is slow on this CPU."""


def lora_weights(adapter: str) -> bytes:
    return (Path(adapter) / "adapter_model.safetensors").read_bytes()
