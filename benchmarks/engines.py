"""Three generation engines on the same collaborate prompts, in one run.

The collaborate stage asks n samples, with token log-probabilities, of every unlabeled
question. Here the pipeline's own question prompts (``prompts.question_prompt``, the hf
recipe's "text" style, no retrieved examples) for the first --prompts questions of fpb's
unlabeled split get n samples each at temperature 1 from:

  generate  transformers' batched ``model.generate(num_return_sequences=n,
            output_logits=True)``, --batch-size prompts at a time, log-probabilities from
            the raw logits;
  loop      ``HFBackend.generate_with_logprobs``, our decode loop: --batch-size prompts at
            a time, each prompt read once and its KV cache shared by its n samples;
  vllm      the same backend generating on a vLLM server (``HFBackend(vllm_url=...)``): one
            request per prompt with n and logprobs, all in flight at once.

All three run the same float32 weights: generate and loop in this process on the model
folder `make vllm` exports (torch on every core), vllm on a server started here from
`make vllm`'s venv and that folder, with ``--dtype float32`` and vLLM's CPU defaults
otherwise (on 2 cores: the engine on one, its API server on the other). --lora adds
"loop+lora" and "vllm+lora": the same through a LoRA adapter (r=16, all linear layers)
trained here for two steps (its weights do not matter for speed).

Tokens are the generated ones up to the end of turn, over all samples. The engines take
turns, --repeats rounds; the table shows every round, then the median and range of
tokens/s and of the ratios of each round. The load average is printed: other jobs on the
machine slow every engine, and the ratios within a round are what compare.

    python benchmarks/engines.py [--prompts 32] [--n 4] [--max-tokens 32] [--repeats 3] [--lora]

Prints a table, then (last line) one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from semievol import prompts as prompt_text  # noqa: E402
from semievol.backends.hf import HFBackend, stop_ids  # noqa: E402
from semievol.backends.vllm import start_server  # noqa: E402
from semievol.config import FinetuneConfig  # noqa: E402
from semievol.data import load_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FPB = REPO.parent / "shared" / "data" / "fpb"
VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"
MODEL = REPO / ".vllm" / "smollm2-135m"


def run_generate(backend: HFBackend, prompts, n: int, max_tokens: int, batch_size: int,
                 seed: int) -> int:
    """transformers' own batched sampling; returns the tokens generated."""
    torch.manual_seed(seed)
    generated = 0
    with backend.loaded(backend.default_model) as (model, tok), torch.inference_mode():
        stop = stop_ids(tok, model)
        for start in range(0, len(prompts), batch_size):
            texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[start:start + batch_size]]
            inputs = tok(texts, padding=True, padding_side="left", add_special_tokens=False,
                         return_tensors="pt").to(model.device)
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=max_tokens,
                                 eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
            new = out.sequences[:, inputs["input_ids"].shape[1]:]
            logprobs = torch.stack([torch.log_softmax(step.float(), -1).gather(
                1, new[:, i:i + 1])[:, 0] for i, step in enumerate(out.logits)], 1)
            for row, lps in zip(new.tolist(), logprobs.tolist()):
                length = next((i for i, t in enumerate(row) if t in stop), len(row))
                generated += len(lps[:length])
    return generated


def run_backend(backend: HFBackend, model: str, prompts, n: int, max_tokens: int,
                seed: int) -> int:
    out = backend.generate_with_logprobs(model, prompts, n=n, temperature=1.0,
                                         max_tokens=max_tokens, seed=seed)
    return sum(len(g.tokens) for gens in out for g in gens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora", action="store_true", help="also through a LoRA adapter")
    args = parser.parse_args(argv)
    if not (VLLM_PYTHON.exists() and (MODEL / "config.json").exists()):
        sys.exit("vLLM is not set up: run `make vllm` first")

    task = load_task(FPB, limits={"unlabeled": args.prompts})
    prompts = [prompt_text.question_prompt(ex, "text", []) for ex in task.unlabeled]
    work = Path(tempfile.mkdtemp(prefix="engines-"))
    local = HFBackend(str(MODEL), workdir=work, batch_size=args.batch_size, quiet=True)
    server, url = start_server(MODEL, python=VLLM_PYTHON, args=["--dtype", "float32"],
                               env={"VLLM_CPU_KVCACHE_SPACE": "2"}, log=work / "vllm.log")
    try:
        remote = HFBackend(str(MODEL), workdir=work, vllm_url=url, quiet=True)
        models = {"base": local.default_model}
        if args.lora:
            examples = [prompt_text.training_example(ex, ex.answer, "text")
                        for ex in task.labeled[:16]]
            models["lora"] = local.finetune(local.default_model, examples,
                                            FinetuneConfig(epochs=1, batch_size=8), key="lora")
        engines = {"generate": lambda seed: run_generate(local, prompts, args.n, args.max_tokens,
                                                         args.batch_size, seed)}
        for kind, model in models.items():
            suffix = "" if kind == "base" else "+lora"
            engines["loop" + suffix] = lambda seed, m=model: run_backend(
                local, m, prompts, args.n, args.max_tokens, seed)
            engines["vllm" + suffix] = lambda seed, m=model: run_backend(
                remote, m, prompts, args.n, args.max_tokens, seed)
        run_generate(local, prompts[:2], args.n, 4, args.batch_size, seed=0)  # warm up
        for model in models.values():
            for backend in (local, remote):
                backend.generate_with_logprobs(model, prompts[:2], n=args.n, temperature=1.0,
                                               max_tokens=4, seed=0)
        with local.loaded(local.default_model) as (_, tok):
            lengths = [len(tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"])
                       for p in prompts]
        load_before = os.getloadavg()[0]
        print(f"{len(prompts)} fpb collaborate prompts of {min(lengths)}-{max(lengths)} "
              f"tokens, n={args.n}, max_tokens={args.max_tokens}, temperature 1, float32; "
              f"local batches of {args.batch_size} prompts on {torch.get_num_threads()} torch "
              f"threads; load average {load_before:.1f} at the start", flush=True)
        rounds: list[dict[str, tuple[float, int]]] = []
        for rep in range(args.repeats):
            measured = {}
            for name, engine in engines.items():
                start = time.perf_counter()
                tokens = engine(rep)
                measured[name] = (time.perf_counter() - start, tokens)
                seconds = measured[name][0]
                print(f"round {rep + 1}  {name:<10}{tokens:>6} tokens {seconds:>7.1f} s "
                      f"{tokens / seconds:>7.1f} tok/s", flush=True)
            rounds.append(measured)
        load_after = os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait(60)

    speed = {name: [r[name][1] / r[name][0] for r in rounds] for name in engines}
    ratios = {"loop/generate": ("loop", "generate"), "vllm/loop": ("vllm", "loop"),
              "vllm/generate": ("vllm", "generate")}
    if args.lora:
        ratios.update({"loop+lora/loop": ("loop+lora", "loop"),
                       "vllm+lora/vllm": ("vllm+lora", "vllm")})
    ratio = {k: [a / b for a, b in zip(speed[x], speed[y])] for k, (x, y) in ratios.items()}
    print(f"load average {load_after:.1f} at the end")
    print(f"{'engine':<12}{'median tok/s':>14}{'range':>16}")
    for name in engines:
        print(f"{name:<12}{statistics.median(speed[name]):>14.1f}"
              f"{f'{min(speed[name]):.1f}-{max(speed[name]):.1f}':>16}")
    for name, values in ratio.items():
        print(f"{name:<16} median {statistics.median(values):.2f}x "
              f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")
    print(json.dumps({
        **{f"{name}_tokens_per_s": round(statistics.median(v), 1) for name, v in speed.items()},
        **{name: round(statistics.median(v), 2) for name, v in ratio.items()},
        "ratio_ranges": {name: [round(min(v), 2), round(max(v), 2)] for name, v in ratio.items()},
        "tokens_per_s_ranges": {name: [round(min(v), 1), round(max(v), 1)]
                                for name, v in speed.items()},
        "prompts": len(prompts), "n": args.n, "max_tokens": args.max_tokens,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "prompt_tokens": [min(lengths), max(lengths)], "dtype": "float32",
        "load_average": [round(load_before, 1), round(load_after, 1)]}))


if __name__ == "__main__":
    sys.exit(main())
