"""Inference through a LoRA adapter on the embedded model: the adapter merged into the
weights while it runs (how the hf backend runs one now) against a separate LoRA path in
every linear layer (before), measured in one run.

    python benchmarks/adapter.py [--prompts 64] [--n 4] [--max-tokens 4]

The adapter has the shape `finetune` trains (r=16, all linear layers) with random weights,
saved where and as the backend saves one. The prompts are fpb test sentences in the small
recipe's prompt; each is sampled n times at temperature 1 with log-probabilities, as the
collaborate stage does. A trained adapter answers fpb in one to three tokens, so reading
the prompt is most of the work; this random one does not stop, so its samples are cut at
--max-tokens (4) to keep that proportion. Both ways use the same seed, so they should
give the same tokens: the table shows seconds, tokens/s, the share of identical samples
and the largest log-probability difference. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from semievol import prompts
from semievol.backends.hf import RECORD, HFBackend
from semievol.data import load_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fpb"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=4)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        backend = HFBackend(workdir=workdir, quiet=True)
        adapter = random_adapter(backend, Path(workdir) / "adapter")
        questions = [prompts.question_prompt(ex) for ex in load_task(args.data).test[:args.prompts]]
        backend.generate_with_logprobs(adapter, questions[:1], max_tokens=2)  # attach, warm up

        def sample():
            started = time.perf_counter()
            out = backend.generate_with_logprobs(adapter, questions, n=args.n, temperature=1.0,
                                                 max_tokens=args.max_tokens, seed=0)
            return time.perf_counter() - started, [g for gens in out for g in gens]

        backend.merge_adapters = False  # as before merging
        separate_s, separate = sample()
        backend.merge_adapters = True
        merged_s, merged = sample()
    tokens = sum(len(g.tokens) for g in merged)
    same = [(m, s) for m, s in zip(merged, separate) if m.tokens == s.tokens]
    drift = max((abs(a - b) for m, s in same for a, b in zip(m.logprobs, s.logprobs)), default=0.0)
    rows = {"separate LoRA path (before)": (separate_s, sum(len(g.tokens) for g in separate)),
            "merged while running (now)": (merged_s, tokens)}
    print(f"{args.prompts} fpb prompts, n={args.n}, max_tokens={args.max_tokens}, temperature 1, "
          f"LoRA r=16 all-linear, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'adapter':<30}{'seconds':>9}{'tokens':>8}{'tokens/s':>10}")
    for name, (seconds, count) in rows.items():
        print(f"{name:<30}{seconds:>9.1f}{count:>8}{count / seconds:>10.1f}")
    ratio = separate_s / merged_s
    print(f"speed-up {ratio:.2f}x; identical samples {len(same)}/{len(merged)}; "
          f"largest log-probability difference {drift:.1e}")
    result = {"prompts": args.prompts, "n": args.n, "seconds": round(merged_s, 2),
              "separate_seconds": round(separate_s, 2), "speedup": round(ratio, 2),
              "identical_samples": len(same), "samples": len(merged),
              "max_logprob_difference": drift, "threads": torch.get_num_threads()}
    print(json.dumps(result))
    return result


def random_adapter(backend: HFBackend, path: Path) -> str:
    """An adapter directory as `finetune` writes one, with random (not zero) LoRA weights."""
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM",
                        init_lora_weights=False)
    with backend.loaded(backend.default_model) as (base, _):
        model = get_peft_model(base, config)
        model.save_pretrained(str(path), save_embedding_layers=False)
        model.unload()  # the LoRA layers out of the backend's base model again, in place
    (path / RECORD).write_text(json.dumps({"base": backend.default_model}))
    return str(path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
