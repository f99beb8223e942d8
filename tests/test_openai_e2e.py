"""End to end over real HTTP: `semievol run --backend openai` against a local
`semievol serve --backend hf` (the embedded model) on a slice of fpb. The run is killed
(SIGKILL) while its warm-up fine-tuning job runs and started again: it finishes, and the
server saw exactly two fine-tuning jobs (warm-up and evolve), none paid twice, and the guard
returns the model its sampled evidence points to (SFT only on evidence that evolving did
harm). The same warm-up with `--backend hf` gives the same vanilla and SFT accuracies within
one test item (backend parity: greedy answers, the same seeded fine-tune). Past the warm-up
the two paths part: mining samples, and a server draws each request's samples apart while
the local backend draws a batch's together (the evolved models differed on up to 5 of 16
test items), so the local run mines only one item; its evolve step (that item and the
replayed labels) still runs, and nothing is asserted of it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_pipeline_hf import check_schema
from test_server import API_KEY, running_server

pytestmark = pytest.mark.slow

SLICE = ["--limit-labeled", "24", "--validation", "4", "--limit-unlabeled", "16",
         "--limit-test", "16", "--recipe", "small", "--epochs", "2", "--evolve-epochs", "1",
         "--batch-size", "8", "--max-tokens", "8", "--quiet"]
"""20 labels to train on for two epochs (the SFT model must beat the base), 4 held out for
the guard (its 16 samples a question at temperature 1 are most of a run's generation), 16
test items (parity to one of them), 16 to mine. The evolve step trains one epoch: it must
continue the warm-up's model as a second job, not learn more."""


def test_openai_backend_through_semievol_serve(shared, tmp_path):
    out = tmp_path / "run"
    with running_server("hf", tmp_path / "state") as server:
        common = [sys.executable, "-m", "semievol", "run", "--data", str(shared / "data" / "fpb"),
                  "--model", "smollm2-135m", *SLICE]
        args = common + ["--backend", "openai", "--base-url", server.url, "--out", str(out),
                         "--lr-multiplier", "4"]
        env = {**os.environ, "OPENAI_API_KEY": API_KEY}
        first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        jobs = out / "backend" / "jobs"
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            records = [json.loads(p.read_text()) for p in jobs.glob("*.json")] if jobs.exists() else []
            if any(r.get("job_id") for r in records):
                break
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read().decode()
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert not (out / "results.json").exists()

        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1200)
        assert second.returncode == 0, second.stdout + second.stderr
        results = json.loads((out / "results.json").read_text())
        check_schema(results)
        assert results["backend"] == "openai" and results["base_model"] == "smollm2-135m"
        assert results["models"]["warm"].startswith("ft:") and results["models"]["evolved"].startswith("ft:")
        assert results["models"]["evolved"] != results["models"]["warm"]
        listed = server.client().fine_tuning.jobs.list(limit=100).data
        assert len(listed) == 2 and {j.status for j in listed} == {"succeeded"}
        assert results["usage"]["trained_tokens"] > 0 and results["usage"]["cost_usd"] is None
        for path in out.rglob("*"):
            if path.is_file():
                assert API_KEY not in path.read_text(errors="ignore")

        # the same warm-up and test items locally; one item to mine, the least mining there is
        local = subprocess.run(common + ["--backend", "hf", "--lr", "4e-4", "--limit-unlabeled", "1",
                                         "--out", str(tmp_path / "hf")],
                               capture_output=True, text=True, timeout=1200,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert local.returncode == 0, local.stdout + local.stderr
        hf = json.loads((tmp_path / "hf" / "results.json").read_text())
        accuracies = {stage: (hf["eval"][stage]["accuracy"], results["eval"][stage]["accuracy"])
                      for stage in ("vanilla", "sft")}  # greedy answers of the same seeded fine-tune
        for local_accuracy, hosted_accuracy in accuracies.values():
            assert abs(local_accuracy - hosted_accuracy) <= 1 / 16, accuracies
        v = results["validation"]  # the guard returns the model its evidence points to
        (verdict,) = v["comparisons"]
        assert v["chosen"] == ("sft" if verdict["harm"] else "r1")
        assert [e["id"] for e in v["evidence"]["r1"]] == v["ids"]
        assert results["eval"]["final"] == results["eval"][results["final"]]
        assert hf["eval"]["sft"]["accuracy"] > hf["eval"]["vanilla"]["accuracy"]
        assert results["eval"]["sft"]["accuracy"] > results["eval"]["vanilla"]["accuracy"]
