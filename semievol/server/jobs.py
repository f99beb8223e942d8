"""Fine-tuning jobs: validate their files, then train them one at a time on a background
thread, so HTTP requests stay responsive while a model trains.

A job moves ``validating_files -> queued -> running -> succeeded | failed | cancelled``.
Every move is a locked check-and-write in the :class:`~semievol.server.store.Store`, so a
cancel never races the worker. Training calls ``backend.finetune(base, examples, config,
key=<job id>)``; the job id as idempotency key means a job trained again after a restart
reuses an adapter the backend already finished instead of training twice.

Restart (:meth:`Trainer.recover`): jobs still ``validating_files`` are validated again,
``queued`` ones queued again in creation order, and a job found ``running`` (the server
stopped during training) is resumed once: it goes back to ``queued`` with a warning event.
If it is found ``running`` a second time (the job may be what kills the server) it is
``failed`` with error code ``server_stopped``. A cancelled running job cannot interrupt the
backend: training goes on until ``finetune`` returns, and its result is thrown away.

Hyperparameters (OpenAI's names -> :class:`~semievol.config.FinetuneConfig`):

- ``n_epochs`` -> ``epochs``; "auto" is OpenAI's documented rule: 3 epochs, raised so the
  model sees at least 100 examples (at most 25 epochs), lowered to see at most 25,000.
- ``batch_size`` -> ``batch_size``; "auto" = ``min(8, number of examples)``.
- ``learning_rate_multiplier`` -> ``learning_rate = multiplier * 1e-4`` (1e-4 is the paper's
  LoRA learning rate); "auto" = 1.0.
- ``seed`` -> ``seed`` (a random one when not given, reported on the job like OpenAI).

A job's private ``_finetune`` (FinetuneConfig fields a dialect took directly, such as a
learning rate or a LoRA rank) wins over this mapping, and its ``_min_examples`` over the
server's minimum (both set through :func:`~semievol.server.service.submit_job`).
"""
from __future__ import annotations

import logging
import math
import queue
import threading

from ..config import FinetuneConfig
from .store import Store, describe, now
from ..chatfile import InvalidFile, read_chat_examples

log = logging.getLogger("semievol.server")

BASE_LEARNING_RATE = FinetuneConfig().learning_rate
"""What ``learning_rate_multiplier`` multiplies: the paper's LoRA learning rate, 1e-4."""


def resolve_hyperparameters(requested: dict, n_examples: int) -> dict:
    """Replace every "auto" (or missing) hyperparameter by the value that will be used."""
    epochs = requested.get("n_epochs", "auto")
    if epochs == "auto":
        epochs = 3
        if n_examples * 3 < 100:
            epochs = min(25, math.ceil(100 / n_examples))
        elif n_examples * 3 > 25_000:
            epochs = max(1, 25_000 // n_examples)
    batch = requested.get("batch_size", "auto")
    if batch == "auto":
        batch = min(FinetuneConfig().batch_size, n_examples)
    multiplier = requested.get("learning_rate_multiplier", "auto")
    return {"batch_size": batch, "learning_rate_multiplier":
            1.0 if multiplier == "auto" else float(multiplier), "n_epochs": epochs}


class Trainer:
    """The one background worker that trains jobs in order, one at a time."""

    def __init__(self, store: Store, backend, backend_lock: threading.Lock, *,
                 min_examples: int):
        self.store = store
        self.backend = backend
        self.backend_lock = backend_lock
        """Held around every backend call: the Backend protocol promises no thread safety."""
        self.min_examples = min_examples
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="semievol-trainer",
                                        daemon=True)

    def start(self) -> None:
        self.recover()
        self._thread.start()

    def stop(self) -> None:
        """Stop taking jobs. A training in progress is abandoned with the process (the job
        is found ``running`` at the next start and resumed)."""
        self._queue.put(None)

    def recover(self) -> None:
        """Pick up where a stopped server left off (see the module docstring)."""
        for job in sorted(self.store.jobs(), key=lambda j: (j["created_at"], j["id"])):
            if job["status"] == "validating_files":
                self.validate(job["id"])
            elif job["status"] == "queued":
                self._queue.put(job["id"])
            elif job["status"] == "running" and job.get("_resumed"):
                self._fail(job["id"], "server_stopped", "The server stopped twice while this "
                           "job was training; it is not retried again.", only_from={"running"})
            elif job["status"] == "running":
                self.store.update_job(
                    job["id"], {"status": "queued", "_resumed": True}, level="warn",
                    event="The server stopped while this job was training; job re-queued "
                          "(an adapter that had finished is reused)")
                self._queue.put(job["id"])

    def validate(self, job_id: str) -> None:
        """Check the job's files; move it to ``queued`` (and the queue) or to ``failed``."""
        job = self.store.job(job_id)
        if job is None or job["status"] != "validating_files":
            return
        try:
            examples = self._read(job["training_file"], "training_file",
                                  job.get("_min_examples", self.min_examples))
            if job["validation_file"]:
                self._read(job["validation_file"], "validation_file", 1)
        except _FileFailure as e:
            self._fail(job_id, f"invalid_{e.param}", str(e), param=e.param, line=e.line,
                       only_from={"validating_files"})
            return
        except Exception as e:  # an unreadable file must not leave the job validating
            log.exception("validating fine-tuning job %s failed", job_id)
            self._fail(job_id, "server_error", describe(e), only_from={"validating_files"})
            return
        self.store.save_examples(job_id, examples)
        hyper = resolve_hyperparameters(job["_requested_hyperparameters"], len(examples))
        method = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
        if self.store.update_job(job_id, {"status": "queued", "hyperparameters": hyper,
                                          "method": method}, only_from={"validating_files"},
                                 event="Files validated, moving job to queued state"):
            self._queue.put(job_id)

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a job that has not finished; None if it had."""
        with self.store.lock:
            running = self.store.job(job_id)["status"] == "running"
            return self.store.update_job(
                job_id, {"status": "cancelled", "finished_at": now()},
                only_from={"validating_files", "queued", "running"},
                event="Fine-tuning job cancelled" + (
                    " (the training under way runs to its end and is discarded)"
                    if running else ""))

    # -- the worker ---------------------------------------------------------------------
    def _loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                self._train(job_id)
            except Exception as e:  # never let one job kill the worker
                log.exception("fine-tuning job %s crashed the worker", job_id)
                self._fail(job_id, "server_error", describe(e),
                           only_from={"running", "queued"})

    def _train(self, job_id: str) -> None:
        job = self.store.update_job(job_id, {"status": "running"}, only_from={"queued"},
                                    event="Fine-tuning job started")
        if job is None:  # cancelled while queued
            return
        examples = self.store.examples(job_id)
        hyper = job["hyperparameters"]
        config = FinetuneConfig(**{
            "epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"],
            "learning_rate": hyper["learning_rate_multiplier"] * BASE_LEARNING_RATE,
            "seed": job["seed"], **job.get("_finetune", {})})
        steps = math.ceil(len(examples) / config.batch_size) * hyper["n_epochs"]
        self.store.add_event(job_id, f"Training {len(examples)} examples for "
                             f"{hyper['n_epochs']} epochs: {steps} steps of batch size "
                             f"{config.batch_size}, learning rate {config.learning_rate:g}")
        try:
            with self.backend_lock:
                ref = self.backend.finetune(job["_base_ref"], examples, config, key=job_id)
        except Exception as e:
            log.exception("fine-tuning job %s failed", job_id)
            self._fail(job_id, "training_failed", f"Training failed: {describe(e)}",
                       only_from={"running"})
            return
        name = job["_fine_tuned_model"]
        with self.store.lock:
            if self.store.job(job_id)["status"] != "running":  # cancelled meanwhile
                return
            self.store.add_model(name, ref, job_id=job_id, base=job["_root_model"])
            self.store.update_job(job_id, {"status": "succeeded", "fine_tuned_model": name,
                                           "finished_at": now(),
                                           "trained_tokens": ref.usage.trained_tokens})
            self.store.add_event(job_id, f"New fine-tuned model created: {name}")
            self.store.add_event(job_id, "The job has successfully completed")

    def _read(self, file_id: str, param: str, min_examples: int):
        if self.store.file(file_id) is None:
            raise _FileFailure(f"File {file_id} no longer exists.", param)
        data = self.store.file_path(file_id).read_bytes()
        try:
            return read_chat_examples(data, min_examples=min_examples)
        except InvalidFile as e:
            raise _FileFailure(f"The job failed due to an invalid {param.replace('_', ' ')}. "
                               f"{e}", param, e.line) from None

    def _fail(self, job_id: str, code: str, message: str, *, param: str | None = None,
              line: int | None = None, only_from: set[str]) -> None:
        error = {"code": code, "message": message, "param": param}
        if code.startswith("invalid_"):
            error["line"] = line
        self.store.update_job(job_id, {"status": "failed", "finished_at": now(),
                                       "error": error},
                              only_from=only_from, event=message, level="error")


class _FileFailure(Exception):
    def __init__(self, message: str, param: str, line: int | None = None):
        self.param, self.line = param, line
        super().__init__(message)
