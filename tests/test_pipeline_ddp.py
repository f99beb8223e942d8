"""`semievol run` beyond one float32 process, on a real fpb slice with the real model:

- two data-parallel processes under torchrun on CPU (gloo): DDP fine-tunes, generation and
  evaluation split over the ranks, only rank 0 writing the run directory, and a rerun that
  resumes (skips everything);
- one process in bfloat16 from a plain Hugging Face folder (`--model DIR --dtype bfloat16`).

Each rank runs with OMP_NUM_THREADS=1: two processes with torch's default thread count
oversubscribe two cores twenty-fold (../shared/ENVIRONMENT.md)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from test_pipeline_hf import check_schema
from conftest import need  # noqa: E402

pytestmark = pytest.mark.slow
need("peft")

SLICE = ["--limit-labeled", "16", "--validation", "4", "--limit-unlabeled", "8",
         "--limit-test", "8", "--epochs", "1", "--samples", "2", "--max-tokens", "6",
         "--generation-batch", "2", "--quiet"]
"""Every stage split over the ranks, the guard's included, at the smallest size that
still gives each rank several batches. ``--samples`` is ``--n``, which torchrun's own
parser takes for an abbreviation of its options."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(shared, out, tmp, procs=2):
    """`python -m torch.distributed.run --nproc_per_node 2 -m semievol run ...` on loopback;
    ``tmp`` is the ranks' TMPDIR, where rank 1 keeps its private copy of the run."""
    tmp.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "semievol", "run", "--data", str(shared / "data" / "fpb"), "--backend", "hf",
            "--out", str(out), *SLICE]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    return subprocess.run(args, capture_output=True, text=True, timeout=1500, env=env)


def test_two_process_run_then_resume(shared, tmp_path):
    out, tmp = tmp_path / "run", tmp_path / "tmp"
    first = torchrun(shared, out, tmp)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    results = json.loads((out / "results.json").read_text())
    check_schema(results)
    assert results["runtime"]["world_size"] == 2
    assert results["runtime"]["device"] == "cpu" and results["runtime"]["generation_engine"] == "hf"
    assert results["eval"]["semievol"]["n"] == 8 and results["unlabeled"]["total"] == 8
    assert results["validation"]["n"] == 4 and results["validation"]["comparisons"]
    mined = [json.loads(line) for line in (out / "collaborate_r1.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in mined) == sorted({r["id"] for r in mined})  # each item once
    assert len(mined) == 8
    assert first.stdout.count("run directory:") == 1  # only rank 0 prints the summary
    adapters = sorted(p.name for p in (out / "backend" / "adapters").iterdir())
    assert len(adapters) == 2 and not any(n.startswith(".") for n in adapters)
    assert not list(tmp.glob("semievol-rank*"))  # rank 1's private copy is gone

    manifest = (out / "manifest.json").read_text()
    again = torchrun(shared, out, tmp)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    assert (out / "manifest.json").read_text() == manifest  # every stage skipped
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["eval"] == results["eval"] and resumed["models"] == results["models"]
    assert "train_runtime" not in again.stdout + again.stderr  # no fine-tune ran


def test_bfloat16_run_from_a_model_folder(shared, hf_folder_bf16_two_layers, tmp_path):
    """The run's plumbing in bf16 (load, both fine-tunes, generation, results) on a
    two-layer cut of the model and a small slice: this CPU has no bf16 instructions (the
    whole model took 20 minutes here). test_hf_bf16.py checks the whole model's bf16
    numerics: logprobs, learning, adapter switching."""
    out = tmp_path / "run"
    small = ["--limit-labeled", "8", "--limit-unlabeled", "8", "--limit-test", "8",
             "--epochs", "1", "--batch-size", "4", "--max-tokens", "8", "--quiet"]
    args = [sys.executable, "-m", "semievol", "run", "--data", str(shared / "data" / "fpb"),
            "--backend", "hf", "--model", str(hf_folder_bf16_two_layers), "--dtype", "bfloat16",
            "--out", str(out), *small]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    results = json.loads((out / "results.json").read_text())
    check_schema(results)
    assert results["runtime"]["dtype"] == "bfloat16" and results["runtime"]["world_size"] == 1
    assert results["base_model"] == str(hf_folder_bf16_two_layers)
    assert results["models"]["evolved"] != results["models"]["warm"]  # both fine-tunes ran
