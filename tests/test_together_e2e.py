"""End to end over real HTTP in Together's dialect: `semievol run --backend together`
against a local `semievol serve --backend hf` (the embedded model) on a slice of fpb. The run
is killed (SIGKILL) as soon as the server has a fine-tune and started again: it finishes,
the server holds exactly two fine-tunes (warm-up, and evolve continuing it through
``from_checkpoint``), none paid twice, and no key is left on disk. What the fine-tunes
learn, and parity with the local backend, are test_openai_e2e's part: this run is the
smallest with both fine-tunes (8 labels, replayed in the evolve step, one epoch each)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_pipeline_hf import check_schema
from test_openai_e2e import SLICE
from test_server import API_KEY, running_server

pytestmark = pytest.mark.slow


SMALLEST = ["--limit-labeled", "8", "--limit-unlabeled", "8", "--limit-test", "4",
            "--epochs", "1"]


def fine_tunes(server) -> list[dict]:
    response = httpx.get(server.url + "/fine-tunes",
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def test_together_backend_through_semievol_serve(shared, tmp_path):
    out = tmp_path / "run"
    with running_server("hf", tmp_path / "state") as server:
        args = [sys.executable, "-m", "semievol", "run", "--data", str(shared / "data" / "fpb"),
                "--backend", "together", "--base-url", server.url, "--model", "smollm2-135m",
                *SLICE, "--validation", "0",  # the guard is test_openai_e2e's
                *SMALLEST, "--lr", "4e-4", "--timeout", "600", "--out", str(out)]
        env = {**os.environ, "TOGETHER_API_KEY": API_KEY}
        first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not fine_tunes(server):
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read().decode()
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert len(fine_tunes(server)) == 1 and not (out / "results.json").exists()

        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1500)
        assert second.returncode == 0, second.stdout + second.stderr
        results = json.loads((out / "results.json").read_text())
        check_schema(results)
        assert results["backend"] == "together" and results["base_model"] == "smollm2-135m"
        warm, evolved = results["models"]["warm"], results["models"]["evolved"]
        assert warm.startswith("semievol/smollm2-135m-semievol-") and evolved != warm
        listed = fine_tunes(server)
        assert len(listed) == 2 and {j["status"] for j in listed} == {"completed"}
        by_output = {j["model_output_name"]: j for j in listed}
        assert by_output[evolved]["from_checkpoint"] == warm
        assert by_output[warm]["learning_rate"] == 4e-4 and by_output[warm]["n_epochs"] == 1
        assert results["usage"]["trained_tokens"] > 0 and results["usage"]["cost_usd"] is None
        for path in out.rglob("*"):
            if path.is_file():
                assert API_KEY not in path.read_text(errors="ignore")
