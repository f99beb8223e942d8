"""`semievol run --backend hf` on a real slice of fpb with the embedded model: the results
schema and the export of a whole run, a run killed (SIGKILL) during inference that resumes
with nothing lost or repeated and no second warm-up fine-tune, and runs killed at random
points that resume to the uninterrupted run's results.

Each run is the smallest that still shows its point (two fine-tunes, items in several
batches); the whole run is made once and shared. The guard's validation slice on the real
model is test_openai_e2e.py's part (its local run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import need

pytestmark = pytest.mark.slow

SLICE = ["--epochs", "1", "--lr", "4e-4", "--quiet"]
TINY = ["--limit-labeled", "8", "--limit-unlabeled", "8", "--limit-test", "8", "--validation",
        "0", "--n", "2", "--max-tokens", "6", "--generation-batch", "4"]
"""With SLICE: a run of a minute or two on two CPU cores, both fine-tunes included."""


def run_cli(shared, out, *extra, wait=True):
    args = [sys.executable, "-m", "semievol", "run", "--data", str(shared / "data" / "fpb"),
            "--backend", "hf", "--out", str(out), *SLICE, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)


def check_schema(results: dict) -> None:
    """DESIGN.md section 3: the fields and types other parts rely on."""
    assert isinstance(results["backend"], str) and isinstance(results["base_model"], str)
    models = results["models"]
    assert isinstance(models["base"], str)
    assert all(models[k] is None or isinstance(models[k], str) for k in ("warm", "evolved"))
    for name in ("vanilla", "sft", "semievol"):
        row = results["eval"][name]
        assert isinstance(row["accuracy"], float) and 0 <= row["accuracy"] <= 1
        assert isinstance(row["macro_f1"], float) and 0 <= row["macro_f1"] <= 1
        assert isinstance(row["n"], int)
    u = results["unlabeled"]
    for key in ("total", "consistent", "justified", "selected"):
        assert isinstance(u[key], int)
    for key in ("all", "selected"):
        value = u["pseudo_label_accuracy"][key]
        assert value is None or 0 <= value <= 1
    usage = results["usage"]
    for key in ("prompt_tokens", "completion_tokens", "trained_tokens"):
        assert isinstance(usage[key], int)
    assert usage["cost_usd"] is None or isinstance(usage["cost_usd"], float)
    assert all(isinstance(v, float) for v in results["timings_s"].values())
    assert results["final"] in ("sft", "semievol") and isinstance(models["final"], str)
    assert isinstance(results["validation"]["n"], int)
    runtime = results["runtime"]
    assert isinstance(runtime["world_size"], int) and runtime["world_size"] >= 1
    assert isinstance(runtime["device"], str) and isinstance(runtime["dtype"], str)
    assert runtime["generation_engine"] in ("hf", "vllm", "api")
    assert all(isinstance(v, str) for v in runtime["versions"].values())
    assert "semievol" in runtime["versions"]


@pytest.fixture(scope="module")
def whole(shared, tmp_path_factory):
    """One uninterrupted TINY run: (its directory, its process, its seconds)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    start = time.time()
    result = run_cli(shared, out, *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result, time.time() - start


def test_run_on_fpb_slice(shared, whole, tmp_path):
    out, result, _ = whole
    results = json.loads((out / "results.json").read_text())
    check_schema(results)
    assert results["backend"] == "hf" and results["base_model"] == "smollm2-135m"
    assert results["eval"]["semievol"]["n"] == 8 and results["unlabeled"]["total"] == 8
    assert results["usage"]["trained_tokens"] > 0 and results["usage"]["prompt_tokens"] > 0
    assert {"warmup", "collaborate_r1", "eval_semievol"} <= set(results["timings_s"])
    assert "SemiEvol" in result.stdout
    assert results["runtime"]["world_size"] == 1 and results["runtime"]["dtype"] == "float32"
    assert results["runtime"]["generation_engine"] == "hf" and results["runtime"]["device"] == "cpu"
    check_export(shared, out, results, tmp_path / "exported")


def check_export(shared, run_dir, results, out):
    """Issue 27: `semievol export RUN_DIR` writes the final model as an adapter folder that
    plain peft loads over the base model, and it answers test questions as the run's final
    model did (greedy, the run's own prompts)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semievol.backends.hf.weights import cached
    from semievol.data import load_task
    from semievol.prompts import question_prompt

    done = subprocess.run([sys.executable, "-m", "semievol", "export", str(run_dir), "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == \
        ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "library_name: peft" in card
    base = cached("smollm2-135m")  # the embedded GGUF as a plain float32 folder
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
    task = load_task(str(shared / "data" / "fpb"), limits={"labeled": 8, "unlabeled": 8,
                                                            "test": 8})
    answered = {r["id"]: r for r in map(json.loads, (run_dir / f"eval_{results['final']}.jsonl")
                                        .read_text().splitlines())}
    merged_dir = out.parent / "merged"
    done = subprocess.run([sys.executable, "-m", "semievol", "export", str(run_dir), "--out",
                           str(merged_dir), "--merge"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "library_name: peft" not in (merged_dir / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers
    for ex in task.test[:6]:
        ids = tok.apply_chat_template(question_prompt(ex, "text"), add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        for m in (model, merged):
            with torch.no_grad():
                new = m.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
            assert tok.decode(new, skip_special_tokens=True).strip() == \
                answered[ex.id]["response"].strip()


def test_killed_during_inference_resumes_without_loss_or_repeats(shared, tmp_path, mlflow_server,
                                                                monkeypatch):
    """...and with ``--report-to mlflow,tensorboard`` (issue 27): one MLflow run, on a real
    tracking server, holds the full loss curves and the final scores."""
    need("mlflow")
    need("tensorboard")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "run"
    mined = out / "collaborate_r1.jsonl"
    proc = run_cli(shared, out, *KILLED, *TRACK, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if mined.exists() and 0 < len(mined.read_text().splitlines()) < 16:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(l) for l in mined.read_text().splitlines() if l.strip()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["warmup"]["status"] == "done"
    warmup_time = manifest["timings_s"]["warmup"]
    assert 0 < len(before) < 16

    result = run_cli(shared, out, *KILLED, *TRACK)
    assert result.returncode == 0, result.stdout + result.stderr
    after = [json.loads(l) for l in mined.read_text().splitlines()]
    assert len(after) == 16 and len({r["id"] for r in after}) == 16
    assert after[: len(before)] == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings_s"]["warmup"] == warmup_time  # the warm-up did not run again
    adapters = sorted(p.name for p in (out / "backend" / "adapters").iterdir() if not p.name.startswith("."))
    assert len(adapters) == 2  # one warm-up, one evolve
    results = json.loads((out / "results.json").read_text())
    check_schema(results)
    check_mlflow(mlflow_server, out, results)


KILLED = ["--limit-labeled", "16", "--limit-unlabeled", "16", "--limit-test", "8",
          "--validation", "0", "--batch-size", "4", "--n", "2", "--max-tokens", "6",
          "--generation-batch", "4"]
"""Mining in four batches (a kill finds some items done), and each fine-tune two steps or
more (a loss curve)."""
TRACK = ["--report-to", "mlflow,tensorboard"]


def check_mlflow(url, out, results):
    """One MLflow run holds each fine-tune's whole loss curve (the warm-up's logged before
    the kill, the evolve's after it), the test scores and results.json."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("semievol").experiment_id])
    assert run.info.status == "FINISHED"
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("warmup", "evolve_r1"):
        curve = manifest["stages"][stage]["losses"]
        assert len(curve) >= 2 and all(loss > 0 for _, loss in curve)
        history = client.get_metric_history(run.info.run_id, f"loss/{stage}")
        assert [[m.step, m.value] for m in history] == curve
    for label in ("vanilla", "sft", "semievol", "final"):
        name = "final/accuracy" if label == "final" else f"test/{label}/accuracy"
        (point,) = client.get_metric_history(run.info.run_id, name)
        assert point.value == pytest.approx(results["eval"][label]["accuracy"])
    assert {"results.json", "report.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (out / "tensorboard").is_dir()


def test_killed_at_random_points_resumes_to_an_uninterrupted_runs_results(shared, whole,
                                                                          tmp_path):
    """Issue 25: kill -9 at random points of a real run, then resume: the results equal an
    uninterrupted run's, no item is recorded twice, and no adapter is trained twice (nor
    any stage done twice: a stage done before a kill takes no more time after it). The
    kill times are printed, to replay one."""
    import random

    whole_dir, _, took = whole
    out = tmp_path / "killed"
    adapters = out / "backend" / "adapters"
    seed = int(os.environ.get("SEMIEVOL_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kills = sorted(rng.uniform(0.1, 0.9) * took for _ in range(2))
    print(f"SEMIEVOL_KILL_SEED={seed}: kills {kills} s into runs of {took:.0f} s")
    done: dict[str, float] = {}  # stage -> its time, once it is done
    for after in kills:
        proc = run_cli(shared, out, *TINY, wait=False)
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        manifest = json.loads((out / "manifest.json").read_text()) \
            if (out / "manifest.json").exists() else {"stages": {}}
        for stage, info in manifest["stages"].items():
            if info["status"] == "done" and stage in manifest["timings_s"]:
                done.setdefault(stage, manifest["timings_s"][stage])
    result = run_cli(shared, out, *TINY)
    assert result.returncode == 0, result.stdout + result.stderr

    whole, resumed = (json.loads((d / "results.json").read_text()) for d in (whole_dir, out))
    for run in (whole, resumed):  # model references name the run's own directory
        for r in run["rounds"]:
            del r["model"]
    for key in ("eval", "unlabeled", "rounds", "sizes", "final"):
        assert resumed[key] == whole[key], key
    for jsonl in out.glob("*.jsonl"):
        ids = [json.loads(line)["id"] for line in jsonl.read_text().splitlines()]
        assert len(ids) == len(set(ids)), jsonl.name
    names = sorted(p.name for p in adapters.iterdir() if not p.name.startswith("."))
    assert len(names) == 2  # one warm-up, one evolve
    timings = json.loads((out / "manifest.json").read_text())["timings_s"]
    assert {stage: timings[stage] for stage in done} == done
