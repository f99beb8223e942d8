"""One process against N data-parallel processes (torchrun) on the hf backend's three kinds
of work: a collaborate-stage generation call (fpb questions, n samples), an embedding call
and a LoRA fine-tune. Runs the settings interleaved, ``--trials`` times each, every process
with ``OMP_NUM_THREADS=1`` (so N processes use N cores, as on N GPUs one each), and prints
the median seconds, their spread and the speed-up. The last line is one JSON object.

    python benchmarks/data_parallel.py --data ../shared/data/fpb --procs 2 --trials 3
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/fpb")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--samples", type=int, default=4, help="n: samples per question")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--train", type=int, default=32, help="fine-tuning examples (1 epoch)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    times: dict[int, list[dict]] = {1: [], args.procs: []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.trials):
        for procs in (1, args.procs):  # interleaved: drifting load hits both alike
            times[procs].append(launch(procs, args))
            print(procs, times[procs][-1], file=sys.stderr, flush=True)
            loads.append(os.getloadavg()[0])
    report(times, args, loads)


def launch(procs: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker",
           "--data", args.data, "--questions", str(args.questions),
           "--samples", str(args.samples), "--max-tokens", str(args.max_tokens),
           "--train", str(args.train)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def worker(args) -> None:
    """One rank: load the model, then time each kind of work (every rank takes part)."""
    import tempfile

    from semievol import prompts
    from semievol.backends.hf import HFBackend
    from semievol.config import FinetuneConfig
    from semievol.data import load_task

    task = load_task(args.data, limits={"labeled": args.train, "unlabeled": args.questions,
                                        "test": 1})
    work = Path(tempfile.mkdtemp(prefix="semievol-dp-"))
    backend = HFBackend(workdir=work, quiet=True)
    asks = [prompts.question_prompt(ex) for ex in task.unlabeled]
    backend.embed(["warm up"])  # loads the model
    timings = {}

    def timed(name, fn):
        backend.barrier()
        start = time.perf_counter()
        fn()
        backend.barrier()
        timings[name] = round(time.perf_counter() - start, 2)

    timed("generate", lambda: backend.generate_with_logprobs(
        backend.default_model, asks, n=args.samples, temperature=1.0,
        max_tokens=args.max_tokens, seed=0))
    timed("embed", lambda: backend.embed([ex.question for ex in task.unlabeled]))
    examples = [prompts.training_example(ex, ex.answer) for ex in task.labeled]
    timed("finetune", lambda: backend.finetune(
        backend.default_model, examples, FinetuneConfig(epochs=1, learning_rate=4e-4,
                                                        batch_size=8),
        key=f"dp-{os.environ.get('WORLD_SIZE', '1')}"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(timings))


def report(times: dict[int, list[dict]], args, loads: list[float]) -> None:
    procs = args.procs
    print(f"\nhf backend, 1 vs {procs} data-parallel processes (OMP_NUM_THREADS=1 each), "
          f"median of {args.trials} interleaved trials [min-max]; machine load average "
          f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n")
    print(f"{'work':<44}{'1 proc s':>16}{f'{procs} procs s':>16}{'speed-up':>10}")
    what = {"generate": f"generate {args.questions} fpb questions x n={args.samples}, "
                        f"{args.max_tokens} tok",
            "embed": f"embed {args.questions} questions",
            "finetune": f"LoRA fine-tune {args.train} examples, batch 8"}
    figures = {}
    for name, label in what.items():
        one = [t[name] for t in times[1]]
        many = [t[name] for t in times[procs]]
        ratio = statistics.median(one) / statistics.median(many)
        figures[name] = {"one_s": one, "many_s": many, "speedup": round(ratio, 2)}
        print(f"{label:<44}{_cell(one):>16}{_cell(many):>16}{ratio:>9.2f}x")
    print(json.dumps({"procs": procs, "load_average": [round(x, 1) for x in loads], **figures}))


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.0f}-{max(values):.0f}]"


if __name__ == "__main__":
    main()
