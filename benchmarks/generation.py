"""Generation throughput of the hf backend against a naive loop, on the embedded model.

The collaborating-inference stage asks for n samples (with token log-probabilities) of
each unlabeled question. `HFBackend.generate_with_logprobs` batches prompts and reads each
prompt once for its n samples; the naive way is one `model.generate(output_logits=True)`
call per prompt and sample. Both run here on the same loaded model and prompts, sampling
at temperature 1; generated tokens (up to the end-of-turn token) are counted.

Prompts (~150-170 tokens) are fpb-style sentiment questions with three solved examples, as
in-context propagation builds them: sentences come from ../shared/data/fpb/test.csv when
it is beside the repository, else from a few made-up ones.

    python benchmarks/generation.py [--prompts 16] [--n 4] [--max-tokens 32]

Prints a table, then (last line) one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from semievol.backends.hf import HFBackend, stop_ids  # noqa: E402

FPB = Path(__file__).resolve().parents[2] / "shared" / "data" / "fpb" / "test.csv"
MADE_UP = [
    ("Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period.",
     "positive"),
    ("The company said it will cut 120 jobs at its plant in Tampere due to weak demand.",
     "negative"),
    ("The board will propose a dividend of EUR 0.45 per share at the annual general meeting.",
     "neutral"),
    ("Net sales decreased by 6.5 % to EUR 41.2 mn, and the outlook remains uncertain.",
     "negative"),
    ("The new contract is worth about EUR 3 mn and deliveries start in the spring.",
     "positive"),
    ("The shares are listed on the Helsinki stock exchange under the ticker ABC1V.",
     "neutral"),
]


def sentences(limit: int) -> list[tuple[str, str]]:
    """(sentence, sentiment) pairs: fpb's test split if present, else the made-up ones."""
    if FPB.is_file():
        with FPB.open(newline="") as f:
            rows = [(r["question"].split("\n", 1)[-1].strip(), r["gt"]) for r in csv.DictReader(f)]
        # sentences of moderate length keep the prompts at ~150-170 tokens
        return [row for row in rows if 50 <= len(row[0]) <= 100][:limit]
    return (MADE_UP * (limit // len(MADE_UP) + 1))[:limit]


def build_prompts(count: int) -> list[list[dict]]:
    """Three solved examples then the question: the in-context-propagation prompt shape."""
    pool = sentences(count + 3)
    prompts = []
    for i in range(count):
        shots = [pool[(i + j + 1) % len(pool)] for j in range(3)]
        lines = ["Sentiment of the financial sentence: negative, neutral or positive?", ""]
        for text, label in shots:
            lines += [f"Sentence: {text}", f"Sentiment: {label}", ""]
        lines += [f"Sentence: {pool[i][0]}", "Sentiment:"]
        prompts.append([{"role": "user", "content": "\n".join(lines)}])
    return prompts


def run_batched(backend: HFBackend, prompts, n: int, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    out = backend.generate_with_logprobs(backend.default_model, prompts, n=n, temperature=1.0,
                                         max_tokens=max_tokens, seed=0)
    return time.perf_counter() - start, sum(len(g.tokens) for gens in out for g in gens)


def run_naive(backend: HFBackend, prompts, n: int, max_tokens: int) -> tuple[float, int]:
    """One generate() call per prompt and sample, logprobs from its raw logits."""
    with backend.loaded(backend.default_model) as (model, tok):
        return _naive(model, tok, prompts, n, max_tokens)


def _naive(model, tok, prompts, n: int, max_tokens: int) -> tuple[float, int]:
    stop = stop_ids(tok, model)
    torch.manual_seed(0)
    start, generated = time.perf_counter(), 0
    for messages in prompts:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
        for _ in range(n):
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_tokens, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            steps = next((i for i, t in enumerate(new) if t in stop), len(new))
            logprobs = [torch.log_softmax(out.logits[i][0].float(), -1)[new[i]].item()
                        for i in range(steps)]
            generated += len(logprobs)
    return time.perf_counter() - start, generated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-prompts", type=int, default=None,
                        help="run the (slow) naive loop on only this many of the prompts")
    args = parser.parse_args(argv)

    backend = HFBackend(batch_size=args.batch_size, quiet=True)
    prompts = build_prompts(args.prompts)
    backend.generate_with_logprobs(backend.default_model, prompts[:1], max_tokens=2)  # load, warm
    with backend.loaded(backend.default_model) as (_, tok):
        pass
    lengths = [len(tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]) for p in prompts]

    batched_s, batched_tokens = run_batched(backend, prompts, args.n, args.max_tokens)
    naive_s, naive_tokens = run_naive(backend, prompts[:args.naive_prompts], args.n,
                                      args.max_tokens)
    fast, slow = batched_tokens / batched_s, naive_tokens / naive_s

    print(f"{args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens, n={args.n}, "
          f"max_tokens={args.max_tokens}, temperature 1, {torch.get_num_threads()} threads")
    print(f"{'method':<32}{'seconds':>10}{'tokens':>10}{'tokens/s':>10}")
    print(f"{'generate_with_logprobs (batched)':<32}{batched_s:>10.1f}{batched_tokens:>10}"
          f"{fast:>10.1f}")
    print(f"{'naive generate() loop':<32}{naive_s:>10.1f}{naive_tokens:>10}{slow:>10.1f}")
    print(f"ratio {fast / slow:.2f}x")
    print(json.dumps({
        "tokens_per_s": round(fast, 2), "naive_tokens_per_s": round(slow, 2),
        "ratio": round(fast / slow, 2), "prompts": args.prompts, "n": args.n,
        "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "prompt_tokens": [min(lengths), max(lengths)], "generated_tokens": batched_tokens,
        "naive_generated_tokens": naive_tokens, "seconds": round(batched_s, 2),
        "naive_seconds": round(naive_s, 2), "device": str(backend.device),
        "data": "fpb" if FPB.is_file() else "made-up"}))


if __name__ == "__main__":
    sys.exit(main())
