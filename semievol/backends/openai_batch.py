"""Chat requests through OpenAI's Batch API: half the price, results within 24 hours.

A call's requests go out as one batch per 50,000; each batch's id is recorded (in the
backend's ``workdir/batches/``) the moment it exists, so a rerun waits on the same batches
instead of paying again, and only the requests that failed or expired are resubmitted, up
to ``BATCH_ROUNDS`` submissions in all.
"""
from __future__ import annotations

import json
from collections.abc import Callable

from openai.types.chat import ChatCompletion

from ..errors import BackendError
from ..rundir import digest
from ..types import Generation, Usage
from .hosted import Records, jsonl

BATCH_MAX_REQUESTS = 50_000
BATCH_ROUNDS = 3
"""Batch submissions per chunk: the first, then resubmissions of what failed or expired."""
BATCH_DONE = {"completed", "failed", "expired", "cancelled"}


class BatchAPI:
    """The Batch API over an OpenAI ``client``, for the openai adapter (:mod:`.openai`), which
    hands over how it translates errors (``errors(what)``, a context manager), prints
    progress (``say``), polls (``poll(fetch, done)``) and reads a completion (``parse``)."""

    def __init__(self, client, records: Records, *, errors: Callable, say: Callable,
                 poll: Callable, parse: Callable):
        self.client, self.records = client, records
        self.errors, self.say, self.poll, self.parse = errors, say, poll, parse

    def generate(self, bodies: list[dict]) -> list[tuple[list[Generation], Usage]]:
        """Each chat request body's generations and usage, in order."""
        return [answer for start in range(0, len(bodies), BATCH_MAX_REQUESTS)
                for answer in self._submit(bodies[start:start + BATCH_MAX_REQUESTS])]

    def _submit(self, bodies: list[dict]) -> list[tuple[list[Generation], Usage]]:
        """Chat requests through the Batch API: submit, wait, read the output file, and
        resubmit only what failed or expired (up to BATCH_ROUNDS submissions). The batch
        ids are recorded first thing, so a rerun waits on the same batches."""
        ids = [f"r{i}" for i in range(len(bodies))]
        by_id = dict(zip(ids, bodies))
        key = "batch-" + digest(json.dumps(bodies, sort_keys=True))[:24]
        record = self.records.read("batches", key) or {"key": key, "batch_ids": []}
        results: dict[str, tuple[list[Generation], Usage]] = {}
        errors: list[str] = []
        for batch_id in record["batch_ids"]:
            self.say(f"resuming batch {batch_id}")
            self._collect(self._wait(batch_id), by_id, results, errors)
        while missing := [i for i in ids if i not in results]:
            if len(record["batch_ids"]) >= BATCH_ROUNDS:
                raise BackendError(
                    f"{len(missing)} of {len(ids)} batch requests still failed after "
                    f"{BATCH_ROUNDS} submissions ({errors[-1] if errors else 'no reason given'})"
                    "; run again to retry them")
            lines = jsonl({"custom_id": i, "method": "POST", "url": "/v1/chat/completions",
                            "body": by_id[i]} for i in missing)
            with self.errors("submitting a batch"):
                upload = self.client.files.create(file=(f"{key}.jsonl", lines,
                                                        "application/jsonl"), purpose="batch")
                batch = self.client.batches.create(
                    input_file_id=upload.id, endpoint="/v1/chat/completions",
                    completion_window="24h", metadata={"semievol_key": key})
            record["batch_ids"].append(batch.id)
            self.records.write("batches", key, record)
            self.say(f"batch {batch.id} submitted: {len(missing)} requests")
            self._collect(self._wait(batch.id), by_id, results, errors)
        return [results[i] for i in ids]

    def _wait(self, batch_id: str):
        def fetch():
            with self.errors(f"checking batch {batch_id}"):
                batch = self.client.batches.retrieve(batch_id)
            counts = batch.request_counts
            self.say(f"  batch {batch_id}: {batch.status}" + (
                f" ({counts.completed}/{counts.total} done, {counts.failed} failed)"
                if counts else ""))
            return batch

        batch = self.poll(fetch, lambda b: b.status in BATCH_DONE)
        if batch.status not in BATCH_DONE:
            raise BackendError(f"batch {batch_id} is still {batch.status}; run again to "
                               "resume waiting on it")
        return batch

    def _collect(self, batch, by_id: dict, results: dict, errors: list) -> None:
        """Read a finished batch's output (and error) file into ``results``; what failed
        goes to ``errors`` and stays missing, to be resubmitted."""
        for data in (batch.errors.data or []) if batch.errors else []:
            errors.append(f"batch {batch.id} {batch.status}: {data.message}")
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in self.read_file(file_id).splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                response, custom_id = item.get("response") or {}, item.get("custom_id")
                if response.get("status_code") == 200 and custom_id in by_id:
                    completion = ChatCompletion.model_validate(response["body"])
                    results[custom_id] = self.parse(completion, by_id[custom_id])
                else:
                    error = item.get("error") or (response.get("body") or {}).get("error") or {}
                    errors.append(f"{custom_id}: {error.get('message', 'failed')}")

    def read_file(self, file_id: str) -> str:
        """A file's content (a batch's output or error file)."""
        with self.errors(f"downloading file {file_id}"):
            # the spec types this body as JSON, the SDK asks for application/binary: ask for
            # anything, which every server answers
            return self.client.files.content(file_id, extra_headers={"Accept": "*/*"}).text
