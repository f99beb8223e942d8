"""The run directory: everything a run made, written so that a crash or kill at any point
loses no finished work.

    RUN_DIR/
      config.json          the RunConfig (written once, atomically)
      manifest.json        run id, stage status, model references, usage, timings, each
                           split's fingerprint (atomic)
      <stage>.jsonl        one record per finished item, appended and flushed as it finishes
      <stage>.json         whole-stage outputs (atomic)
      results.json         written last, atomically
      backend/             what the backend keeps (adapters, fine-tuning job records)

Resume is the simple way: a stage marked done in the manifest is skipped; an item-wise stage
reads its JSONL and continues after the last complete line (a torn last line from a kill is
cut once, before this process first appends to the file; appends never re-read it, so a
stage's cost per item stays flat however large it grows); a fine-tune is keyed, so the
backend returns the finished model instead of training or paying again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .types import Usage

log = logging.getLogger("semievol")
T = TypeVar("T")


def digest(data: str | bytes) -> str:
    """SHA-256 hex digest of text or bytes."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def slug(key: str) -> str:
    """A file name for a key (a job, batch or adapter key): its readable part and a hash,
    since keys may hold any character and two keys must never share a file."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.")[:60]
    return f"{readable}-{digest(key)[:8]}" if readable else digest(key)[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file so readers see the old content or the new, never a mix. A file
    that holds ``text`` already is left alone, so a finished run resumes (and rewrites
    nothing) on a read-only directory."""
    path = Path(path)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text(encoding="utf-8") == text:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming(path), os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def naming(path: Path):
    """Give an OSError that names no file (a write or fsync on a full disk) ``path``, so
    the error a person reads says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


class RunDir:
    """One run's directory and its manifest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "manifest.json"
        if manifest.exists():
            self.manifest = json.loads(manifest.read_text())
        else:
            self.manifest = {"run_id": uuid.uuid4().hex[:12], "stages": {}, "models": {},
                             "usage": {}, "usage_by_stage": {}, "timings_s": {}}
            self.save()
        self.manifest.setdefault("usage_by_stage", {})  # a run made before it was kept
        self._appending: set[str] = set()
        """JSONL files this process has checked for a torn tail (then only appends)."""

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def backend_dir(self) -> Path:
        return self.path / "backend"

    def save(self) -> None:
        atomic_write_json(self.path / "manifest.json", self.manifest)

    # -- stages ------------------------------------------------------------------------
    def once(self, name: str, compute: Callable[[], dict[str, Any] | None],
             load: Callable[[], T] | None = None, *, model: str | None = None,
             timed: bool = True) -> T | dict:
        """Stage ``name``, done once however often the run resumes: unless the manifest
        marks it done, ``compute()`` does its work and the stage is marked done; then
        ``load()`` reads what it made back (by default its manifest entry).

        ``compute`` writes what it makes (records as they finish, a JSON file) and returns
        what the manifest keeps of it: a ``usage`` (counted in the same write that marks
        the stage done), a ``model``, counts. An item-wise stage's ``compute`` skips the
        records it finds. ``model``: the model the stage works on, noted before it starts;
        a stage found done (or begun) for another model is forgotten and done again.
        ``timed``: its seconds are added to ``timings_s``, a kill's included."""
        if model is not None and self.stage_info(name).get("model", model) != model:
            self.restart(name)  # it worked on another model: the run had other rounds then
        if not self.done(name):
            if model is not None:
                self.begin(name, model=model)
            start = time.perf_counter()
            log.info("stage %s", name)
            try:
                info = compute() or {}
            finally:
                if timed:
                    self.add_time(name, time.perf_counter() - start)
            self.finish(name, **({"model": model} if model is not None else {}), **info)
        return load() if load is not None else self.stage_info(name)

    def done(self, stage: str) -> bool:
        return self.manifest["stages"].get(stage, {}).get("status") == "done"

    def stage_info(self, stage: str) -> dict:
        return self.manifest["stages"].get(stage, {})

    def begin(self, stage: str, **info) -> None:
        """Note what an item-wise stage works on before its first record is written (its
        ``model``), so a resume can tell whether the records it finds are of that model."""
        if self.manifest["stages"].get(stage) != {"status": "running", **info}:
            self.manifest["stages"][stage] = {"status": "running", **info}
            self.save()

    def restart(self, stage: str) -> None:
        """Forget a stage and its records (what it used stays counted: it was spent)."""
        self.manifest["stages"].pop(stage, None)
        (self.path / f"{stage}.jsonl").unlink(missing_ok=True)
        self._appending.discard(stage)
        self.save()

    def finish(self, stage: str, *, usage: Usage | None = None, **info) -> None:
        """Mark a stage done, with what it made (a model reference, counts), and count the
        ``usage`` it has not counted yet in the same write (so a fine-tune is counted once:
        with its stage marked done, or not at all and trained again on resume, which
        reports it again)."""
        self.manifest["stages"][stage] = {"status": "done", **info}
        if usage is not None:
            self._count(stage, usage)
        self.save()

    def add_time(self, stage: str, seconds: float) -> None:
        timings = self.manifest["timings_s"]
        timings[stage] = round(timings.get(stage, 0.0) + seconds, 3)
        self.save()

    def add_usage(self, stage: str, usage: Usage) -> None:
        """Count what a stage has used (in the run's total and the stage's own)."""
        self._count(stage, usage)
        self.save()

    def _count(self, stage: str, usage: Usage) -> None:
        for total in (self.manifest["usage"],
                      self.manifest["usage_by_stage"].setdefault(stage, {})):
            for name, value in usage.to_dict().items():
                if value is not None:
                    total[name] = total.get(name, 0) + value

    # -- item-wise JSONL artifacts -----------------------------------------------------
    def records(self, name: str) -> list[dict]:
        """The complete records of ``name``.jsonl (a torn last line is dropped)."""
        return list(self.stream(name))

    def stream(self, name: str) -> Iterator[dict]:
        """The same records, read one line at a time (for stages too large to hold)."""
        return stream_jsonl(self.path / f"{name}.jsonl")

    def append(self, name: str, records: Iterable[dict]) -> None:
        """Append finished records and flush them to disk before returning."""
        path = self.path / f"{name}.jsonl"
        if name not in self._appending:
            _drop_torn_tail(path)
            self._appending.add(name)
        with naming(path), open(path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_records(self, name: str, records: Iterable[dict]) -> None:
        """All of ``name``.jsonl at once, replacing what a stage killed part-way left."""
        self._appending.discard(name)
        atomic_write_text(self.path / f"{name}.jsonl", "".join(
            json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records))

    def write_json(self, name: str, data) -> None:
        atomic_write_json(self.path / name, data)

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())


def stream_jsonl(path: Path) -> Iterator[dict]:
    """The records of a JSONL file, line by line, up to a last line torn by a kill."""
    if not Path(path).exists():
        return
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            if not line.endswith("\n"):
                return  # torn by a kill mid-write
            if line.strip():
                yield json.loads(line)


def _drop_torn_tail(path: Path, chunk: int = 1 << 16) -> None:
    """Cut a last line that a kill left without its newline, so appends stay whole. Reads
    the file backwards from its end, only as far as the last newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        at = end
        while at > 0:
            start = max(0, at - chunk)
            f.seek(start)
            block = f.read(at - start)
            if at == end and block.endswith(b"\n"):
                return
            newline = block.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            at = start
        f.truncate(0)
