"""The server's state on disk, so that a restarted server still knows every file, job,
event, fine-tuned model and idempotent response.

Layout of ``--state-dir``::

    state.db        SQLite (WAL): files, jobs, events, training examples, fine-tuned
                    models, Idempotency-Key responses, the Tinker dialect's training
                    runs and checkpoints; one transaction per change
    files/<id>.bin  the uploaded bytes (written to a temporary file, renamed into place;
                    a temporary or a file without its row, left by a kill, is removed
                    when the store is next opened: one server per state directory)
    backend/        the backend's own workdir (LoRA adapters)

Every state change is one SQLite transaction, so a kill at any moment leaves the old state
or the new, never a mix; events are appended rows, never a rewritten list. Records are
JSON objects in their rows, checked on every read against the shape the code relies on
(:data:`RECORDS`: keys, types, known statuses). A record that cannot be read or has another
shape (edited by hand, written by a broken tool) raises :class:`DamagedRecord`, which names
it and says what is wrong; listings log it and leave it out, and everything else keeps
serving. Names on disk are only ever ids this module generated and checked with
:func:`valid_id`; a client's string never becomes a path.

A state directory of the earlier layout (one JSON file per record) is imported into
``state.db`` the first time it is opened.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import string
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict  # pydantic needs these before 3.12

from ..errors import SemievolError
from ..types import ChatExample

log = logging.getLogger("semievol.server")

_ALPHABET = string.ascii_letters + string.digits
_ID_RE = {prefix: re.compile(rf"{prefix}-[A-Za-z0-9]{{24}}") for prefix in
          ("file", "ftjob", "ftevent")}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                                   job_id TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_of_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS examples (job_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (scope TEXT NOT NULL, key TEXT NOT NULL,
                                        digest TEXT NOT NULL, response TEXT NOT NULL,
                                        PRIMARY KEY (scope, key));
CREATE TABLE IF NOT EXISTS training_runs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (path TEXT PRIMARY KEY, run_id TEXT NOT NULL,
                                        record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_of_run ON checkpoints (run_id, path);
"""


class DamagedRecord(SemievolError):
    """A stored record that cannot be read; the message names it (never a path)."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key used again with a different request body."""


def new_id(prefix: str) -> str:
    """A fresh random id such as ``file-3Yx...`` (24 letters and digits after the dash)."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def valid_id(prefix: str, value: str) -> bool:
    """Whether ``value`` has the exact shape of an id we generate (so it is safe as a name)."""
    return bool(_ID_RE[prefix].fullmatch(value))


def describe(error: BaseException) -> str:
    """An exception in words a client may read: an OSError without its path (a client never
    learns where the state lives), anything else as it says."""
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


def now() -> int:
    return int(time.time())


def public(record: dict) -> dict:
    """The object as the API shows it: the record without its private ``_`` keys."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


class Store:
    """Files, jobs, events and the fine-tuned model registry of one state directory.

    One connection behind one re-entrant lock: ``with store.lock:`` makes several calls
    one atomic step (the job worker's check-then-write)."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.files_dir = self.root / "files"
        self.backend_dir = self.root / "backend"
        for folder in (self.files_dir, self.backend_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        path = self.root / "state.db"
        fresh = not path.exists()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DamagedRecord(f"the server state {path.name} in {self.root.name}/ cannot be "
                                f"opened ({e}); move it aside to start with an empty state") from None
        if fresh:
            _import_json_layout(self)
        self._sweep()

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def _sweep(self) -> None:
        """Remove what a killed server left in files/: upload temporaries, and bytes that were
        renamed into place while their row was never committed (or was deleted)."""
        with self.lock:
            known = {row[0] for row in self._db.execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.startswith(".upload-") or (
                    path.suffix == ".bin" and valid_id("file", path.stem)
                    and path.stem not in known):
                log.warning("removing %s from the state directory: a stopped server left it "
                            "behind", path.name)
                path.unlink(missing_ok=True)

    # -- files --------------------------------------------------------------------------
    def add_file(self, file_id: str, data_path: Path, *, filename: str, purpose: str) -> dict:
        """Adopt an upload already written to ``data_path`` (a temporary file in files/)."""
        final = self.files_dir / f"{file_id}.bin"
        os.replace(data_path, final)
        record = {"id": file_id, "object": "file", "bytes": final.stat().st_size,
                  "created_at": now(), "filename": filename, "purpose": purpose,
                  "status": "processed"}
        with self._change() as db:
            db.execute("INSERT INTO files VALUES (?, ?)", (file_id, _json(record)))
        return record

    def file(self, file_id: str) -> dict | None:
        if not valid_id("file", file_id):
            return None
        return self._one("file", file_id, "SELECT record FROM files WHERE id = ?")

    def files(self) -> list[dict]:
        """Every readable file, newest first."""
        return self._newest_first("file", "files")

    def file_path(self, file_id: str) -> Path:
        """Where a known file's bytes are (call only with an id :meth:`file` returned);
        DamagedRecord, naming the file, when they are missing."""
        assert valid_id("file", file_id)
        path = self.files_dir / f"{file_id}.bin"
        if not path.is_file():
            raise DamagedRecord(f"the content of the stored file {file_id!r} is missing")
        return path

    def delete_file(self, file_id: str) -> bool:
        if not valid_id("file", file_id):
            return False
        with self._change() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        (self.files_dir / f"{file_id}.bin").unlink(missing_ok=True)
        return bool(deleted)

    def _newest_first(self, kind: str, table: str) -> list[dict]:
        rows = self._all(kind, f"SELECT id, record FROM {table}")
        return sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    # -- jobs ---------------------------------------------------------------------------
    def add_job(self, record: dict) -> dict:
        with self._change() as db:
            db.execute("INSERT INTO jobs VALUES (?, ?)", (record["id"], _json(record)))
        return record

    def job(self, job_id: str) -> dict | None:
        if not valid_id("ftjob", job_id):
            return None
        return self._one("job", job_id, "SELECT record FROM jobs WHERE id = ?")

    def jobs(self) -> list[dict]:
        """Every readable job, newest first (the order the API lists them in)."""
        return self._newest_first("job", "jobs")

    def update_job(self, job_id: str, changes: dict, *, only_from: Iterable[str] | None = None,
                   event: str | None = None, level: str = "info") -> dict | None:
        """Apply ``changes`` (and log ``event``) unless the job's status is not one of
        ``only_from``; return the updated job, or None when the update did not apply. The
        check and the write are one transaction under the lock, so a cancel and the worker
        never race."""
        with self._change() as db:
            record = self.job(job_id)
            if record is None or (only_from is not None and record["status"] not in set(only_from)):
                return None
            record.update(changes)
            db.execute("UPDATE jobs SET record = ? WHERE id = ?", (_json(record), job_id))
            if event:
                self._insert_event(db, job_id, event, level, None)
            return record

    def add_event(self, job_id: str, message: str, *, level: str = "info",
                  data: dict | None = None) -> None:
        with self._change() as db:
            self._insert_event(db, job_id, message, level, data)

    def events(self, job_id: str) -> list[dict]:
        """A job's readable events, newest first (the order the API lists them in)."""
        rows = self._all("event", "SELECT seq, record FROM events WHERE job_id = ? "
                         "ORDER BY seq DESC", (job_id,))
        return rows

    def save_examples(self, job_id: str, examples: list[ChatExample]) -> None:
        with self._change() as db:
            db.execute("INSERT OR REPLACE INTO examples VALUES (?, ?)",
                       (job_id, _json(examples)))

    def examples(self, job_id: str) -> list[ChatExample]:
        found = self._one("examples of job", job_id,
                          "SELECT data FROM examples WHERE job_id = ?")
        return found or []

    # -- fine-tuned models --------------------------------------------------------------
    def add_model(self, name: str, ref: str, *, job_id: str, base: str) -> None:
        record = {"ref": ref, "job": job_id, "base": base, "created": now()}
        with self._change() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?, ?)", (name, _json(record)))

    def model(self, name: str) -> dict | None:
        return self._one("model", name, "SELECT record FROM models WHERE name = ?")

    def models(self) -> dict[str, dict]:
        with self.lock:
            rows = self._db.execute("SELECT name, record FROM models ORDER BY name").fetchall()
        out = {}
        for name, text in rows:
            try:
                out[name] = _decode("model", name, text)
            except DamagedRecord as e:
                log.error("%s; left out of the listing", e)
        return out

    # -- Tinker training runs and their checkpoints ---------------------------------------
    def put_training_run(self, record: dict) -> None:
        """Record (or replace) a Tinker training run by its ``id``."""
        with self._change() as db:
            db.execute("INSERT OR REPLACE INTO training_runs VALUES (?, ?)",
                       (record["id"], _json(record)))

    def training_run(self, run_id: str) -> dict | None:
        return self._one("training run", run_id, "SELECT record FROM training_runs WHERE id = ?")

    def training_runs(self) -> list[dict]:
        """Newest first."""
        runs = self._all("training run", "SELECT id, record FROM training_runs")
        return sorted(runs, key=lambda r: r["created"], reverse=True)

    def add_checkpoint(self, record: dict) -> None:
        """Record a checkpoint by its ``tinker_path`` (of training run ``run_id``)."""
        with self._change() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                       (record["tinker_path"], record["run_id"], _json(record)))

    def checkpoint(self, path: str) -> dict | None:
        return self._one("checkpoint", path, "SELECT record FROM checkpoints WHERE path = ?")

    def checkpoints(self, run_id: str | None = None) -> list[dict]:
        """Of one training run, or of all; oldest first."""
        if run_id is None:
            found = self._all("checkpoint", "SELECT path, record FROM checkpoints")
        else:
            found = self._all("checkpoint", "SELECT path, record FROM checkpoints WHERE "
                              "run_id = ?", (run_id,))
        return sorted(found, key=lambda c: c["time"])

    # -- dedicated endpoints (Together's dialect) ----------------------------------------
    def put_endpoint(self, record: dict) -> dict:
        """Add or replace an endpoint's record (deleted ones are kept, marked)."""
        with self._change() as db:
            db.execute("INSERT OR REPLACE INTO endpoints VALUES (?, ?)",
                       (record["id"], _json(record)))
        return record

    def endpoint(self, endpoint_id: str) -> dict | None:
        return self._one("endpoint", endpoint_id, "SELECT record FROM endpoints WHERE id = ?")

    def endpoints(self) -> list[dict]:
        """Every readable endpoint not deleted, newest first."""
        rows = self._all("endpoint", "SELECT id, record FROM endpoints")
        return sorted((e for e in rows if not e.get("deleted")),
                      key=lambda e: (e["created"], e["id"]), reverse=True)

    # -- idempotency --------------------------------------------------------------------
    def idempotent(self, scope: str, key: str, digest: str, make: Callable[[], dict]) -> dict:
        """The response of the first request with this ``Idempotency-Key`` in ``scope``:
        made by ``make()`` the first time and stored in the same transaction, returned as
        stored afterwards, across threads and restarts. The same key with another request
        body (``digest``) raises :class:`IdempotencyConflict`."""
        with self._change() as db:
            row = db.execute("SELECT digest, response FROM idempotency WHERE scope = ? AND "
                             "key = ?", (scope, key)).fetchone()
            if row is not None:
                if row[0] != digest:
                    raise IdempotencyConflict(key)
                return _decode("idempotent response", key, row[1])
            response = make()
            db.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?)",
                       (scope, key, digest, _json(response)))
            return response

    # -- plumbing -----------------------------------------------------------------------
    def _change(self):
        return _Transaction(self)

    def _insert_event(self, db, job_id: str, message: str, level: str, data: dict | None):
        event = {"object": "fine_tuning.job.event", "id": new_id("ftevent"),
                 "created_at": now(), "level": level, "message": message,
                 "data": data or {}, "type": "metrics" if data else "message"}
        db.execute("INSERT INTO events (job_id, record) VALUES (?, ?)",
                   (job_id, _json(event)))

    def _one(self, what: str, name: str, sql: str):
        with self.lock:
            row = self._db.execute(sql, (name,)).fetchone()
        return None if row is None else _decode(what, name, row[0])

    def _all(self, what: str, sql: str, args: tuple = ()) -> list[dict]:
        """The readable records of a query of (name, record) rows; damaged ones are logged
        by name and left out, so one bad record never takes a listing down."""
        with self.lock:
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for name, text in rows:
            try:
                out.append(_decode(what, name, text))
            except DamagedRecord as e:
                log.error("%s; left out of the listing", e)
        return out


class _Transaction:
    """``with store._change() as db``: the lock, then BEGIN IMMEDIATE ... COMMIT (ROLLBACK on
    error). Nested uses join the outer transaction."""

    def __init__(self, store: Store):
        self.store = store
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        self.store.lock.acquire()
        db = self.store._db
        self.outer = not db.in_transaction
        if self.outer:
            db.execute("BEGIN IMMEDIATE")
        return db

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if self.outer:
                self.store._db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.store.lock.release()


def _decode(what: str, name, text: str):
    """A stored JSON record that has the shape of its kind (:data:`RECORDS`), or
    DamagedRecord naming it and what is wrong with it."""
    try:
        value = json.loads(text)
        RECORDS[what].validate_python(value, strict=True)
    except (ValueError, RecursionError, TypeError) as e:  # ValidationError is a ValueError
        raise DamagedRecord(f"the stored {what} {name!r} is damaged ({_why(e)})") from None
    return value


def _why(error: Exception) -> str:
    if not isinstance(error, ValidationError):
        return "not valid JSON"
    first = error.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
_Auto = Literal["auto"]
_Hyperparameters = TypedDict("_Hyperparameters", {
    "n_epochs": int | _Auto, "batch_size": int | _Auto,
    "learning_rate_multiplier": float | _Auto})
_File = TypedDict("_File", {"id": str, "created_at": int, "purpose": str,
                            "bytes": NotRequired[int], "filename": NotRequired[str]})
_Job = TypedDict("_Job", {
    "id": str, "created_at": int, "status": JobStatus, "model": str, "training_file": str,
    "validation_file": str | None, "hyperparameters": _Hyperparameters, "seed": int,
    "metadata": dict[str, str] | None, "error": dict | None,
    "fine_tuned_model": str | None, "finished_at": int | None, "trained_tokens": int | None,
    "user_provided_suffix": str | None, "_requested_hyperparameters": _Hyperparameters,
    "_base_ref": str, "_root_model": str, "_fine_tuned_model": str,
    "_finetune": NotRequired[dict[str, Any]], "_from_checkpoint": NotRequired[str | None],
    "_min_examples": NotRequired[int], "_resumed": NotRequired[bool]})
_Event = TypedDict("_Event", {"id": str, "created_at": int, "message": str,
                              "level": Literal["info", "warn", "error"]})
_Model = TypedDict("_Model", {"ref": str, "job": str, "base": str, "created": int})
_Endpoint = TypedDict("_Endpoint", {
    "id": str, "name": str, "model": str, "ref": str, "created": int,
    "state": Literal["PENDING", "STARTING", "STARTED", "STOPPING", "STOPPED", "ERROR"],
    "deleted": NotRequired[bool]})

_TrainingRun = TypedDict("_TrainingRun", {"id": str, "base_model": str, "rank": int,
                                          "created": float, "last_request": float,
                                          "user_metadata": dict[str, Any] | None})
_Checkpoint = TypedDict("_Checkpoint", {
    "tinker_path": str, "run_id": str, "checkpoint_id": str,
    "checkpoint_type": Literal["training", "sampler"], "time": float, "size_bytes": int,
    "directory": str, "optimizer": bool})

RECORDS = {"file": TypeAdapter(_File), "job": TypeAdapter(_Job),
           "event": TypeAdapter(_Event), "model": TypeAdapter(_Model),
           "training run": TypeAdapter(_TrainingRun), "checkpoint": TypeAdapter(_Checkpoint),
           "endpoint": TypeAdapter(_Endpoint),
           "examples of job": TypeAdapter(list[ChatExample]),
           "idempotent response": TypeAdapter(dict[str, Any])}
"""The shape of each kind of stored record: the keys and types the server's code relies
on (extra keys are allowed). A record of another shape is damaged: read strictly, so a
``created_at`` of ``"yesterday"`` or a status the code does not know never reaches a sort
or a route."""


def _import_json_layout(store: Store) -> None:
    """Bring a state directory of the earlier one-JSON-file-per-record layout into
    state.db (once, when state.db is first made). Unreadable files are logged and skipped."""
    def read(path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            log.error("state file %s could not be imported: %s", path.name, e)
            return None

    jobs_dir = store.root / "jobs"
    with store._change() as db:
        for path in sorted(store.files_dir.glob("file-*.json")):
            if valid_id("file", path.stem) and isinstance(record := read(path), dict):
                db.execute("INSERT OR IGNORE INTO files VALUES (?, ?)", (path.stem, _json(record)))
        for path in sorted(jobs_dir.glob("ftjob-*.json")):
            job_id = path.name.split(".")[0]
            if not valid_id("ftjob", job_id):
                continue
            record = read(path)
            if path.name == f"{job_id}.json" and isinstance(record, dict):
                db.execute("INSERT OR IGNORE INTO jobs VALUES (?, ?)", (job_id, _json(record)))
            elif path.name.endswith(".events.json") and isinstance(record, list):
                for event in record:
                    db.execute("INSERT INTO events (job_id, record) VALUES (?, ?)",
                               (job_id, _json(event)))
            elif path.name.endswith(".examples.json") and isinstance(record, list):
                db.execute("INSERT OR IGNORE INTO examples VALUES (?, ?)", (job_id, _json(record)))
        models = store.root / "models.json"
        if models.exists() and isinstance(record := read(models), dict):
            for name, entry in record.items():
                db.execute("INSERT OR IGNORE INTO models VALUES (?, ?)", (name, _json(entry)))


def _json(value) -> str:
    """A record as strict JSON (no NaN or Infinity, which other readers refuse)."""
    return json.dumps(value, allow_nan=False)
