"""``--report-to``: each tracker read back with its own reader after a run that crashed
once and was resumed (one tracking run, nothing logged twice); a tracker that is down
warns and the run's results are the same."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from semievol import RunConfig, load_backend, track
from semievol.demo import make_task
from semievol.errors import ConfigError
from semievol.pipeline import run

from conftest import free_port, need
from test_pipeline import ticket_rule


class Crash(RuntimeError):
    pass


def crashing_rule(call):
    """ticket_rule until the evolved model is evaluated: a crash after both fine-tunes."""
    if "evolve" in call.model and "Candidate answers" not in call.user and call.temperature == 0:
        raise Crash("killed")
    return ticket_rule(call)


@pytest.fixture()
def task_dir(tmp_path):
    return make_task(tmp_path / "data", sizes={"labeled": 40, "unlabeled": 48, "test": 24})


def crash_then_resume(task_dir, out, report_to):
    """The same run twice: crashed during the last evaluations, then resumed."""
    config = RunConfig(data=str(task_dir), backend="fake", validation=8)
    with pytest.raises(Exception):
        run(config, load_backend("fake", rule=crashing_rule), out, quiet=True,
            report_to=report_to)
    assert not (out / "results.json").exists()
    return run(config, load_backend("fake", rule=ticket_rule), out, quiet=True,
               report_to=report_to)


def fake_curve(run_dir: Path, stage: str) -> list:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["stages"][stage]["losses"]


def test_parse_names_the_trackers():
    assert track.parse(None) == track.parse("none") == ()
    assert track.parse("mlflow, tensorboard,mlflow") == ("mlflow", "tensorboard")
    with pytest.raises(ConfigError, match="unknown tracker neptune"):
        track.parse("tensorboard,neptune")


def test_tensorboard_holds_the_curves_and_scores_once_across_a_resume(task_dir, tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out = tmp_path / "run"
    results = crash_then_resume(task_dir, out, ("tensorboard",))
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["tensors"]  # tensorboard's own writer stores scalars as tensors

    def scalars(tag):
        return [[e.step, float(tensor_util.make_ndarray(e.tensor_proto))] for e in events.Tensors(tag)]

    for stage in ("warmup", "evolve_r1"):
        curve = scalars(f"loss/{stage}")
        expected = [[step, pytest.approx(loss, rel=1e-6)] for step, loss in fake_curve(out, stage)]
        assert curve == expected and len(curve) > 1  # once, though resumed
    for label in ("vanilla", "sft", "semievol"):
        assert scalars(f"test/{label}/accuracy") == \
            [[0, pytest.approx(results["eval"][label]["accuracy"])]]
    assert scalars("final/accuracy") == [[0, pytest.approx(results["eval"]["final"]["accuracy"])]]
    assert "validation/sft/accuracy" in tags and "validation/r1/accuracy" in tags
    assert scalars("unlabeled/selected") == [[0, results["unlabeled"]["selected"]]]
    assert scalars("usage/prompt_tokens") == [[0, results["usage"]["prompt_tokens"]]]
    assert scalars("config/theta") == [[0, 0.5]]
    assert "timings_s/warmup" in tags
    assert (out / "report.md").exists() and (out / "accuracy.png").exists()


def test_a_tracker_that_fails_warns_once_and_the_results_stay_the_same(task_dir, tmp_path,
                                                                       monkeypatch):
    """MLflow pointed at a port nobody listens on: one warning, and results.json equals a
    run without trackers."""
    need("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    config = RunConfig(data=str(task_dir), backend="fake", validation=8)
    plain = run(config, load_backend("fake", rule=ticket_rule), tmp_path / "plain", quiet=True)
    with pytest.warns(RuntimeWarning, match="--report-to mlflow") as caught:
        tracked = run(config, load_backend("fake", rule=ticket_rule), tmp_path / "tracked",
                      quiet=True, report_to=("mlflow",))
    assert len([w for w in caught if "--report-to mlflow" in str(w.message)]) == 1
    drop = ("run_id", "timings_s", "models", "rounds", "validation")
    assert {k: v for k, v in tracked.items() if k not in drop} == \
        {k: v for k, v in plain.items() if k not in drop}


@pytest.mark.slow
def test_mlflow_server_holds_one_run_with_params_curves_scores_and_artifacts(
        task_dir, tmp_path, mlflow_server, monkeypatch):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "run"
    results = crash_then_resume(task_dir, out, ("mlflow",))
    client = MlflowClient(mlflow_server)
    (run_,) = client.search_runs([client.get_experiment_by_name("semievol").experiment_id])
    assert run_.info.run_id == json.loads((out / "tracking.json").read_text())["ids"]["mlflow"]
    assert run_.info.status == "FINISHED"
    assert run_.data.params["theta"] == "0.5" and run_.data.params["finetune.epochs"] == "2"
    for stage in ("warmup", "evolve_r1"):
        history = client.get_metric_history(run_.info.run_id, f"loss/{stage}")
        assert [[m.step, m.value] for m in history] == fake_curve(out, stage)
    for label in ("vanilla", "sft", "semievol"):
        (point,) = client.get_metric_history(run_.info.run_id, f"test/{label}/accuracy")
        assert point.value == pytest.approx(results["eval"][label]["accuracy"])
    assert run_.data.metrics["usage/trained_tokens"] == results["usage"]["trained_tokens"]
    files = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"results.json", "report.md", "config.json", "accuracy.png"} <= files
    logged = json.loads(Path(client.download_artifacts(run_.info.run_id, "results.json",
                                                      str(tmp_path))).read_text())
    assert logged == results


@pytest.mark.slow
def test_wandb_offline_and_trackio_local_read_back(task_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when it is imported
    monkeypatch.delitem(sys.modules, "trackio", raising=False)
    need("wandb")
    need("trackio")
    out = tmp_path / "run"
    results = crash_then_resume(task_dir, out, ("wandb", "trackio"))
    ids = json.loads((out / "tracking.json").read_text())["ids"]

    history, files = wandb_history(tmp_path / "wandb" / "wandb", ids["wandb"])
    curve = [[row["step"], row["loss/warmup"]] for row in history if "loss/warmup" in row]
    assert curve == fake_curve(out, "warmup")  # the two offline parts: one run, nothing twice
    (scores,) = [row for row in history if "test/semievol/accuracy" in row]
    assert scores["test/semievol/accuracy"] == pytest.approx(results["eval"]["semievol"]["accuracy"])
    assert {"results.json", "report.md", "config.json"} <= files

    from trackio.sqlite_storage import SQLiteStorage

    rows = SQLiteStorage.get_logs("semievol", ids["trackio"])
    curve = [[r["step"], r["loss/warmup"]] for r in rows if "loss/warmup" in r]
    assert curve == fake_curve(out, "warmup")
    (final,) = [r for r in rows if "test/semievol/accuracy" in r]
    assert final["test/semievol/accuracy"] == pytest.approx(results["eval"]["semievol"]["accuracy"])
    assert SQLiteStorage.get_run_config("semievol", ids["trackio"])["theta"] == "0.5"


def wandb_history(root: Path, run_id: str) -> tuple[list[dict], set[str]]:
    """The history rows and saved files of an offline wandb run (each resume writes a
    part of its own, as `wandb sync` would upload them): its .wandb files are records in
    the LevelDB log format (32 KiB blocks of checksum, length, type; wandb 0.31 has no
    Python reader left), each a protobuf ``Record`` of wandb's own."""
    from wandb.proto import wandb_internal_pb2

    rows, files = [], set()
    for part in sorted(root.glob(f"offline-run-*-{run_id}")):
        files |= {p.name for p in (part / "files").iterdir()}
        for raw in leveldb_records((part / f"run-{run_id}.wandb").read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, files


def leveldb_records(data: bytes, block: int = 32768):
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:  # a block's padding
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            yield parts
            parts = b""


class Recorder:
    """A tracker that records its calls, or fails every one (a server that is down)."""

    name = "recorder"

    def __init__(self, down=False):
        self.down, self.points = down, []

    def start(self, run_dir, run_name, resume):
        if self.down:
            raise ConnectionError("down")
        return resume or "run-1"

    def log(self, points):
        self.points += points

    def params(self, params):
        self.points.append(("params", len(params), 0))

    def artifacts(self, paths):
        pass

    def finish(self, failed):
        pass


def test_a_tracker_down_before_a_resume_gets_what_it_missed_once(tmp_path):
    with pytest.warns(RuntimeWarning, match="--report-to recorder: ConnectionError"):
        first = track.Tracking([Recorder(down=True)], tmp_path, "run")
    first.curve("warmup", [[1, 2.0], [2, 1.0]])
    again = Recorder()
    second = track.Tracking([again], tmp_path, "run")
    second.curve("warmup", [[1, 2.0], [2, 1.0]])
    second.curve("warmup", [[1, 2.0], [2, 1.0]])  # a stage seen again after a resume
    assert again.points == [("loss/warmup", 2.0, 1), ("loss/warmup", 1.0, 2)]
    third = Recorder()
    track.Tracking([third], tmp_path, "run").curve("warmup", [[1, 2.0], [2, 1.0]])
    assert third.points == []  # logged to this tracking run already
