"""LoRA training step time on fpb examples: how the hf backend batches them (left padding,
output layer only for the answer positions, batches grouped by length) against right
padding, which must compute the output layer from the shortest prompt's end on, and
against left padding in random order, measured in one run.

    python benchmarks/training.py [--steps 12] [--batch-size 8]

The examples are fpb's labeled split, ordered into batches as the Trainer orders them for
one epoch: at random, or grouped by length (transformers' LengthGroupedSampler: random
megabatches, sorted inside). The same --steps randomly chosen places in the epoch are
timed in each order. Each step is a forward and backward pass through the embedded model
with a fresh LoRA adapter (r=16, all linear layers), as `finetune` trains. Prints a table;
the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers.trainer_pt_utils import get_length_grouped_indices

from semievol import prompts
from semievol.backends.hf import AnswerCollator, HFBackend, encode_example
from semievol.data import load_task


class RightPadded:
    """The baseline: pad on the right; the output layer runs from the first position that
    predicts an answer token in any example of the batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)

        def pad(key, value):
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])

        first = min(next(i for i, x in enumerate(f["labels"]) if x != -100) for f in features)
        keep = width - first + 1
        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", -100)[:, -keep:], "logits_to_keep": keep}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "fpb"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    backend = HFBackend(quiet=True)
    with backend.loaded(backend.default_model) as (base, tok):
        return _measure(args, base, tok)


def _measure(args, base, tok) -> dict:
    task = load_task(args.data)
    pool = task.labeled[:len(task.labeled) // args.batch_size * args.batch_size]
    features = [encode_example(tok, prompts.training_example(ex, ex.answer, "text"), 1024)
                for ex in pool]
    torch.manual_seed(0)
    orders = {"random": torch.randperm(len(features)).tolist(),
              "grouped": get_length_grouped_indices([len(f["input_ids"]) for f in features],
                                                    args.batch_size)}
    batches = {name: [[features[i] for i in order[b:b + args.batch_size]]
                      for b in range(0, len(order), args.batch_size)]
               for name, order in orders.items()}
    # the same randomly chosen places in the epoch for each order (evenly spaced ones would
    # fall on the same place in each sorted megabatch)
    picked = random.Random(0).sample(range(len(features) // args.batch_size), args.steps)
    timed = {name: [epoch[b] for b in picked] for name, epoch in batches.items()}
    epoch_tokens = {name: sum(args.batch_size * max(len(f["input_ids"]) for f in batch)
                              for batch in epoch) / len(epoch)
                    for name, epoch in batches.items()}
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                     target_modules="all-linear"))
    model.train()
    rows = {}
    for name, collate, order in [
            ("right padding, random order (before)", RightPadded(tok.pad_token_id), "random"),
            ("left padding, answer logits, random", AnswerCollator(tok.pad_token_id), "random"),
            ("left padding, answer logits, grouped (now)", AnswerCollator(tok.pad_token_id),
             "grouped")]:
        step(model, collate(timed[order][0]))  # warm-up
        started = time.perf_counter()
        kept = padded = 0
        for batch in timed[order]:
            inputs = collate(batch)
            kept += inputs["logits_to_keep"]
            padded += inputs["input_ids"].numel()
            step(model, inputs)
        rows[name] = {"seconds_per_step": (time.perf_counter() - started) / args.steps,
                      "mean_logits_kept": kept / args.steps, "mean_tokens": padded / args.steps,
                      "epoch_mean_tokens": epoch_tokens[order]}
    before, _, now = rows.values()
    ratio = before["seconds_per_step"] / now["seconds_per_step"]
    print(f"{args.steps} of {len(features) // args.batch_size} steps of {args.batch_size} fpb "
          f"training examples, LoRA r=16 all-linear, "
          f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'collator and order':<44}{'s/step':>8}{'tokens':>8}{'epoch tokens':>14}"
          f"{'logit positions':>17}")
    for name, r in rows.items():
        print(f"{name:<44}{r['seconds_per_step']:>8.2f}{r['mean_tokens']:>8.0f}"
              f"{r['epoch_mean_tokens']:>14.0f}{r['mean_logits_kept']:>17.1f}")
    print("tokens: padded tokens per timed step; epoch tokens: per step over the whole epoch")
    print(f"speed-up {ratio:.2f}x")
    result = {"steps": args.steps, "batch_size": args.batch_size, "rows": rows,
              "speedup": round(ratio, 2), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count()}
    print(json.dumps(result))
    return result


def step(model, inputs: dict) -> None:
    model(**{k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}).loss.backward()
    model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
