"""Experiment trackers (``semievol run --report-to mlflow,tensorboard,trackio,wandb``).

Each tracker is one small adapter with four methods (``start``, ``log``, ``artifacts``,
``finish``); ``Tracking`` drives them all for the pipeline and owns what they share:

* **Resume.** The trackers' run ids live in ``RUN_DIR/tracking.json`` with the keys of
  what each has logged, so a resumed run continues the same tracking run and logs nothing
  twice (a loss curve logged before a kill is not logged again after it), and a tracker
  that was down before gets what it missed.
* **Never fatal.** The run directory is the record; a tracker is a copy of it. A tracker
  whose call fails (server down, package missing) warns once and is dropped for the rest
  of the run; the run goes on and loses nothing.
* **No secrets.** Trackers read their credentials from their own environment variables
  (``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``...); nothing here writes them anywhere.

What is logged: the RunConfig as parameters, every fine-tune's loss curve
(``loss/<stage>`` by step), every model's validation and test scores, and at the end the
pseudo-label counts and accuracy, stage timings, tokens and dollars, and results.json,
report.md and its figures as artifacts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from .errors import ConfigError

log = logging.getLogger("semievol")

TRACKERS = ("mlflow", "tensorboard", "trackio", "wandb")
STATE = "tracking.json"
PROJECT = "semievol"


class Tracker(Protocol):
    """One experiment tracker. ``start`` returns the id under which a resumed run finds
    the same tracking run again (passed back as ``resume``); ``log`` takes
    ``(name, value, step)`` points, a whole loss curve in one call."""

    name: str

    def start(self, run_dir: Path, run_name: str, resume: str | None) -> str: ...

    def log(self, points: list[tuple[str, float, int]]) -> None: ...

    def params(self, params: dict[str, str]) -> None: ...

    def artifacts(self, paths: list[Path]) -> None: ...

    def finish(self, failed: bool) -> None: ...


def parse(spec: str | None) -> tuple[str, ...]:
    """``"mlflow,tensorboard"`` -> ("mlflow", "tensorboard"); "none" or empty -> ()."""
    names = tuple(dict.fromkeys(n.strip() for n in (spec or "").split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    wrong = [n for n in names if n not in TRACKERS]
    if wrong:
        raise ConfigError(f"--report-to: unknown tracker {', '.join(wrong)} "
                          f"(choose from {', '.join(TRACKERS)}, or none)")
    return names


def make(name: str) -> Tracker:
    """The adapter for one tracker (its package imported when it starts)."""
    if name == "mlflow":
        return MLflow()
    if name == "tensorboard":
        return TensorBoard()
    if name == "wandb":
        return WandB()
    if name == "trackio":
        return Trackio()
    raise ConfigError(f"unknown tracker {name!r}")


class Tracking:
    """Every chosen tracker for one run directory; each call is made on each live tracker
    and a failing tracker is warned about once and dropped."""

    def __init__(self, trackers: Iterable[Tracker], run_dir: Path, run_name: str):
        self.run_dir = Path(run_dir)
        path = self.run_dir / STATE
        self.state = json.loads(path.read_text()) if path.exists() else {"ids": {}, "logged": {}}
        self.logged = {name: set(keys) for name, keys in self.state["logged"].items()}
        self.live: list[Tracker] = []
        for tracker in trackers:
            try:
                self.state["ids"][tracker.name] = tracker.start(
                    self.run_dir, run_name, self.state["ids"].get(tracker.name))
                self.live.append(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker never fails the run
                _warn(tracker, e)
        self._save()

    def once(self, key: str, call: Callable[[Tracker], None]) -> None:
        """Make ``call`` on every live tracker that has not logged ``key`` before (in this
        run or the one a kill interrupted; a tracker that was down then gets it now)."""
        todo = [t for t in self.live if key not in self.logged.get(t.name, set())]
        for tracker in todo:
            try:
                call(tracker)
                self.logged.setdefault(tracker.name, set()).add(key)
            except Exception as e:  # noqa: BLE001
                _warn(tracker, e)
                self.live.remove(tracker)
        if todo:
            self._save()

    def params(self, config: dict) -> None:
        self.once("params", lambda t: t.params(_flat(config)))

    def curve(self, stage: str, losses: list) -> None:
        """A fine-tune's loss curve: ``losses`` holds ``[step, loss]`` pairs."""
        if losses:
            points = [(f"loss/{stage}", float(loss), int(step)) for step, loss in losses]
            self.once(f"loss/{stage}", lambda t: t.log(points))

    def scores(self, prefix: str, scores: dict, model: str) -> None:
        """A model's scores (accuracy, macro-F1...) under ``prefix`` (e.g. test/sft)."""
        points = _points({f"{prefix}/{k}": v for k, v in scores.items()})
        self.once(f"{prefix}:{model}", lambda t: t.log(points))

    def results(self, results: dict, files: list[Path]) -> None:
        """The end of a run: pseudo-label statistics, timings, usage, and the files."""
        metrics = {f"unlabeled/{k}": v for k, v in results["unlabeled"].items()
                   if isinstance(v, (int, float))}
        metrics |= {f"pseudo_label_accuracy/{k}": v
                    for k, v in results["unlabeled"]["pseudo_label_accuracy"].items()
                    if v is not None}
        metrics |= {f"timings_s/{k}": v for k, v in results["timings_s"].items()}
        metrics |= {f"usage/{k}": v for k, v in results["usage"].items()
                    if isinstance(v, (int, float))}
        metrics |= {f"final/{k}": v for k, v in results["eval"]["final"].items()
                    if isinstance(v, (int, float))}
        points = _points(metrics)
        key = f"results:{results['models']['final']}:{results['usage'].get('prompt_tokens')}"
        self.once(key, lambda t: t.log(points))
        existing = [p for p in files if p.exists()]
        self.once(key + ":files", lambda t: t.artifacts(existing))

    def report(self, run_dir: Path) -> None:
        """Write report.md and its figures for the trackers (``semievol report``); a
        report that cannot be drawn warns and the rest is still logged."""
        from .report import write_report

        try:
            write_report(run_dir)
        except Exception as e:  # noqa: BLE001 - the results are written already
            warnings.warn(f"--report-to: report.md not written ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=2)

    def finish(self, failed: bool = False) -> None:
        for tracker in list(self.live):
            try:
                tracker.finish(failed)
            except Exception as e:  # noqa: BLE001
                _warn(tracker, e)
        self.live = []

    def _save(self) -> None:
        from .rundir import atomic_write_json

        self.state["logged"] = {name: sorted(keys) for name, keys in self.logged.items()}
        atomic_write_json(self.run_dir / STATE, self.state)


def _warn(tracker: Tracker, e: Exception) -> None:
    message = f"--report-to {tracker.name}: {type(e).__name__}: {e}"[:400]
    warnings.warn(f"{message}; the run goes on without {tracker.name} (everything is in "
                  "the run directory)", RuntimeWarning, stacklevel=3)
    log.warning("tracker %s dropped: %s", tracker.name, message)


def _points(metrics: dict) -> list[tuple[str, float, int]]:
    """The numbers of ``metrics`` as points at step 0."""
    return [(k, float(v), 0) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'{e.name} is not installed: pip install "semievol[{extra}]"') from e


class MLflow:
    """MLflow through its client (``MLFLOW_TRACKING_URI``; experiment
    ``MLFLOW_EXPERIMENT_NAME``, else "semievol"). A server that does not answer its health
    check is reported at once rather than after the client's minutes of retries."""

    name = "mlflow"

    def start(self, run_dir, run_name, resume):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        tracking = _need("mlflow.tracking", "mlflow")
        self.client = tracking.MlflowClient()
        uri = self.client.tracking_uri
        if uri.startswith(("http://", "https://")):
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        if resume:
            self.client.update_run(resume, status="RUNNING")
            self.run_id = resume
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        return self.run_id

    def log(self, points):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v, step in points]
        for i in range(0, len(metrics), 1000):  # the REST API's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def params(self, params):
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(_mlflow_key(k), v[:6000])
                                                   for k, v in params.items()])

    def artifacts(self, paths):
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def finish(self, failed):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_-./`` and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class TensorBoard:
    """Event files in ``RUN_DIR/tensorboard`` (a resumed run adds a file beside the
    first; TensorBoard reads the folder as one run). tensorboard's own writer has scalars
    only: the numeric config fields go in as ``config/<field>`` at step 0, and the files
    (results.json, report.md) already sit in the run directory beside the event files."""

    name = "tensorboard"

    def start(self, run_dir, run_name, resume):
        summary = _need("tensorboard.summary", "tensorboard")
        self.dir = Path(run_dir) / "tensorboard"
        self.writer = summary.Writer(str(self.dir))
        return self.dir.name

    def log(self, points):
        for k, v, step in points:
            self.writer.add_scalar(k, v, step=step)
        self.writer.flush()

    def params(self, params):
        self.log([(f"config/{k}", float(v), 0) for k, v in params.items() if _is_number(v)])

    def artifacts(self, paths):
        pass

    def finish(self, failed):
        self.writer.close()


class WandB:
    """Weights & Biases (``WANDB_PROJECT``, else "semievol"; ``WANDB_MODE=offline``
    writes the run locally). Resumes by id."""

    name = "wandb"

    def start(self, run_dir, run_name, resume):
        wandb = _need("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name,
                              id=resume or None, resume="allow")
        return self.run.id

    def log(self, points):
        # wandb's own step only grows; a curve keeps its steps as a metric of its own
        for step, metrics in _by_step(points):
            self.run.log({**metrics, "step": step})

    def params(self, params):
        self.run.config.update(params, allow_val_change=True)

    def artifacts(self, paths):
        for path in paths:
            if path.is_dir():
                for child in sorted(path.iterdir()):
                    self.run.save(str(child), base_path=str(path.parent), policy="now")
            else:
                self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    """trackio, local by default (``TRACKIO_DIR``; ``TRACKIO_PROJECT``, else "semievol").
    A resumed run is found again by its name; trackio replaces a run's config whenever
    it opens it, so every opening gives it the run directory's config.json again."""

    name = "trackio"

    def start(self, run_dir, run_name, resume):
        self.trackio = _need("trackio", "trackio")
        self.run_name, self.run = resume or run_name, None
        saved = Path(run_dir) / "config.json"
        self.config = _flat(json.loads(saved.read_text())) if saved.exists() else None
        return self.run_name

    def _run(self):
        if self.run is None:
            with contextlib.redirect_stdout(sys.stderr):  # it prints where its dashboard is
                self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT),
                                             name=self.run_name, config=self.config,
                                             resume="allow")
        return self.run

    def log(self, points):
        for step, metrics in _by_step(points):
            self._run().log(metrics, step=step)

    def params(self, params):
        self.config = params
        self._run()

    def artifacts(self, paths):
        pass  # trackio keeps metrics; the files stay in the run directory

    def finish(self, failed):
        if self.run is not None:
            with contextlib.redirect_stdout(sys.stderr):
                self.run.finish()


def _by_step(points: list[tuple[str, float, int]]) -> list[tuple[int, dict[str, float]]]:
    steps: dict[int, dict[str, float]] = {}
    for k, v, step in points:
        steps.setdefault(step, {})[k] = v
    return list(steps.items())


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
