"""The server's state on disk, so that a restarted server still knows every file, job,
event and fine-tuned model.

Layout of ``--state-dir``::

    files/<file-id>.json           the OpenAI file object
    files/<file-id>.bin            the uploaded bytes
    jobs/<job-id>.json             the OpenAI fine_tuning.job object (+ private "_" keys)
    jobs/<job-id>.events.json      its events, oldest first
    jobs/<job-id>.examples.json    the training examples, parsed once the file validated
    models.json                    fine-tuned model name -> backend reference
    backend/                       the backend's own workdir (LoRA adapters)

Every JSON file is written whole and atomically (temporary file + ``os.replace``). Names on
disk are only ever ids this module generated and checked with :func:`valid_id`; a client's
string never becomes a path. Everything is also held in memory behind one lock, so reads
are cheap and a read never sees half an update.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import string
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ..rundir import atomic_write_json
from ..types import ChatExample

_ALPHABET = string.ascii_letters + string.digits
_ID_RE = {prefix: re.compile(rf"{prefix}-[A-Za-z0-9]{{24}}") for prefix in
          ("file", "ftjob", "ftevent")}


def new_id(prefix: str) -> str:
    """A fresh random id such as ``file-3Yx...`` (24 letters and digits after the dash)."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def valid_id(prefix: str, value: str) -> bool:
    """Whether ``value`` has the exact shape of an id we generate (so it is safe as a name)."""
    return bool(_ID_RE[prefix].fullmatch(value))


def now() -> int:
    return int(time.time())


def public(record: dict) -> dict:
    """The object as the API shows it: the record without its private ``_`` keys."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


class Store:
    """Files, jobs, events and the fine-tuned model registry of one state directory."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.files_dir = self.root / "files"
        self.jobs_dir = self.root / "jobs"
        self.backend_dir = self.root / "backend"
        for folder in (self.files_dir, self.jobs_dir, self.backend_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._files = _load_all(self.files_dir, "file")
        self._jobs = _load_all(self.jobs_dir, "ftjob")
        self._events = {job_id: _read_json(self.jobs_dir / f"{job_id}.events.json", [])
                        for job_id in self._jobs}
        self._models: dict[str, dict] = _read_json(self.root / "models.json", {})

    # -- files --------------------------------------------------------------------------
    def add_file(self, file_id: str, data_path: Path, *, filename: str, purpose: str) -> dict:
        """Adopt an upload already written to ``data_path`` (a temporary file in files/)."""
        os.replace(data_path, self.files_dir / f"{file_id}.bin")
        record = {"id": file_id, "object": "file", "bytes": (self.files_dir / f"{file_id}.bin")
                  .stat().st_size, "created_at": now(), "filename": filename,
                  "purpose": purpose, "status": "processed"}
        with self.lock:
            atomic_write_json(self.files_dir / f"{file_id}.json", record)
            self._files[file_id] = record
        return record

    def file(self, file_id: str) -> dict | None:
        with self.lock:
            return self._files.get(file_id) if valid_id("file", file_id) else None

    def files(self) -> list[dict]:
        with self.lock:
            return sorted(self._files.values(), key=lambda f: (f["created_at"], f["id"]),
                          reverse=True)

    def file_path(self, file_id: str) -> Path:
        """Where a known file's bytes are (call only with an id :meth:`file` returned)."""
        assert valid_id("file", file_id)
        return self.files_dir / f"{file_id}.bin"

    def delete_file(self, file_id: str) -> bool:
        with self.lock:
            if self.file(file_id) is None:
                return False
            del self._files[file_id]
            (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)
            (self.files_dir / f"{file_id}.bin").unlink(missing_ok=True)
            return True

    # -- jobs ---------------------------------------------------------------------------
    def add_job(self, record: dict) -> dict:
        with self.lock:
            self._jobs[record["id"]] = record
            self._events[record["id"]] = []
            self._save_job(record)
        return record

    def job(self, job_id: str) -> dict | None:
        with self.lock:
            return dict(self._jobs[job_id]) if valid_id("ftjob", job_id) and \
                job_id in self._jobs else None

    def jobs(self) -> list[dict]:
        """Every job, newest first (the order the API lists them in)."""
        with self.lock:
            return sorted((dict(j) for j in self._jobs.values()),
                          key=lambda j: (j["created_at"], j["id"]), reverse=True)

    def update_job(self, job_id: str, changes: dict, *, only_from: Iterable[str] | None = None,
                   event: str | None = None, level: str = "info") -> dict | None:
        """Apply ``changes`` (and log ``event``) unless the job's status is not one of
        ``only_from``; return the updated job, or None when the update did not apply. The
        check and the write happen under one lock, so a cancel and the worker never race."""
        with self.lock:
            record = self._jobs[job_id]
            if only_from is not None and record["status"] not in set(only_from):
                return None
            record.update(changes)
            self._save_job(record)
            if event:
                self.add_event(job_id, event, level=level)
            return dict(record)

    def add_event(self, job_id: str, message: str, *, level: str = "info",
                  data: dict | None = None) -> None:
        with self.lock:
            events = self._events[job_id]
            events.append({"object": "fine_tuning.job.event", "id": new_id("ftevent"),
                           "created_at": now(), "level": level, "message": message,
                           "data": data or {}, "type": "metrics" if data else "message"})
            atomic_write_json(self.jobs_dir / f"{job_id}.events.json", events)

    def events(self, job_id: str) -> list[dict]:
        """A job's events, newest first (the order the API lists them in)."""
        with self.lock:
            return list(reversed(self._events[job_id]))

    def save_examples(self, job_id: str, examples: list[ChatExample]) -> None:
        atomic_write_json(self.jobs_dir / f"{job_id}.examples.json", examples)

    def examples(self, job_id: str) -> list[ChatExample]:
        return _read_json(self.jobs_dir / f"{job_id}.examples.json", [])

    def _save_job(self, record: dict) -> None:
        atomic_write_json(self.jobs_dir / f"{record['id']}.json", record)

    # -- fine-tuned models --------------------------------------------------------------
    def add_model(self, name: str, ref: str, *, job_id: str, base: str) -> None:
        with self.lock:
            self._models[name] = {"ref": ref, "job": job_id, "base": base, "created": now()}
            atomic_write_json(self.root / "models.json", self._models)

    def model(self, name: str) -> dict | None:
        with self.lock:
            return self._models.get(name)

    def models(self) -> dict[str, dict]:
        with self.lock:
            return dict(self._models)


def _load_all(folder: Path, prefix: str) -> dict[str, dict]:
    records = {}
    for path in folder.glob(f"{prefix}-*.json"):
        if valid_id(prefix, path.stem):
            records[path.stem] = _read_json(path, None)
    return {k: v for k, v in records.items() if v is not None}


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default

