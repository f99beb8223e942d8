"""Tokens billed for the collaborate stage: n samples in ONE request per question (ours)
against n separate requests (the authors' code), through the OpenAI backend against a local
`semievol serve`, counted from the server's `usage`, priced for gpt-4o-mini.

    python benchmarks/tokens.py --data ../shared/data/fpb [--questions 24] [--n 4]
                                [--server-backend hf|fake]

Prints a table; the last line is one JSON object with `prompt_token_ratio` (goal <= 0.3 at n=4).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from semievol import cost, propagate
from semievol.collaborate import View, infer
from semievol.data import load_task

KEY = "benchmark-key"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--labeled", type=int, default=64, help="labeled examples to retrieve from")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--server-backend", default="hf", choices=["hf", "fake"])
    p.add_argument("--price-model", default="gpt-4o-mini-2024-07-18")
    args = p.parse_args(argv)

    task = load_task(args.data, limits={"labeled": args.labeled, "unlabeled": args.questions})
    with tempfile.TemporaryDirectory() as state, _server(args.server_backend, Path(state)) as url:
        from semievol.backends import load_backend

        model = {"hf": "smollm2-135m", "fake": "fake-base"}[args.server_backend]
        backend = load_backend("openai", model=model, base_url=url, api_key=KEY,
                               workdir=Path(state) / "client", quiet=True, timeout=600)
        neighbours, _ = propagate.retrieve(backend, task.labeled, task.unlabeled, args.k)
        by_id = {ex.id: ex for ex in task.labeled}
        shots = {uid: [by_id[i] for i in ids] for uid, ids in neighbours.items()}
        ways = {"ours: n samples in one request": [View(True, 1.0, args.n)],
                "authors: n requests of one sample": [View(True, 1.0, 1, seed_offset=i)
                                                       for i in range(args.n)]}
        measured = {}
        for name, views in ways.items():
            start = time.perf_counter()
            _, usage = infer(backend, model, task.unlabeled, shots, views, "text",
                             args.max_tokens, 0)
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            measured[name] = {"prompt_tokens": prompt, "completion_tokens": completion,
                              "requests": len(task.unlabeled) * len(views),
                              "usd_gpt4o_mini": cost.chat_cost(args.price_model, prompt, completion),
                              "seconds": round(time.perf_counter() - start, 2)}
    ours, theirs = measured.values()
    result = {"questions": len(task.unlabeled), "n": args.n, "server_backend": args.server_backend,
              "ours": ours, "authors": theirs,
              "prompt_token_ratio": round(ours["prompt_tokens"] / theirs["prompt_tokens"], 4),
              "cost_ratio": round(ours["usd_gpt4o_mini"] / theirs["usd_gpt4o_mini"], 4)}
    print(f"\ncollaborate stage, {result['questions']} fpb questions, n={args.n}, k={args.k} "
          f"(server: semievol serve --backend {args.server_backend})\n")
    print(f"{'way':<36}{'requests':>9}{'prompt tok':>12}{'compl. tok':>12}{'USD (4o-mini)':>15}")
    for name, m in measured.items():
        print(f"{name:<36}{m['requests']:>9}{m['prompt_tokens']:>12}{m['completion_tokens']:>12}"
              f"{m['usd_gpt4o_mini']:>15.6f}")
    print(f"\nprompt_token_ratio {result['prompt_token_ratio']}, cost ratio {result['cost_ratio']}")
    print(json.dumps(result))
    return result


class _server:
    """`semievol serve` on a free loopback port, for the length of a with-block."""

    def __init__(self, backend: str, state: Path):
        self.backend, self.state = backend, state

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(self.state / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "semievol", "serve", "--backend", self.backend, "--port", str(port),
             "--state-dir", str(self.state / "server"), "--api-key", KEY],
            stdout=self.log, stderr=subprocess.STDOUT, env={"HF_HUB_OFFLINE": "1", **os.environ})
        url = f"http://127.0.0.1:{port}/v1"
        import openai

        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        for _ in range(600):
            if self.process.poll() is not None:
                raise SystemExit((self.state / "server.log").read_text())
            try:
                client.models.list()
                return url
            except openai.APIConnectionError:
                time.sleep(0.2)
        raise SystemExit("server did not start")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


if __name__ == "__main__":
    main()
