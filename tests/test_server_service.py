"""The job service of `semievol serve` (``semievol/server/service.py``) as both dialects
meet it: one job per ``Idempotency-Key``, concurrent, sequential and after a restart, and
the key's length limit. In process (TestClient), through the openai SDK."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serverkit import API_KEY, TEN, assert_openai_error, fake_backend, in_process, upload


def test_idempotency_key_makes_one_job_concurrent_sequential_and_after_a_restart(tmp_path):
    """Ten concurrent creates with one key, the same key again, and again after a restart:
    one job, and every answer is that job as created. The key with another body: 422."""
    state = tmp_path / "state"
    with in_process(fake_backend(), state, API_KEY) as server:
        client = server.client()
        training = upload(client, TEN)

        def create(key, suffix="same"):
            return client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                                  suffix=suffix,
                                                  extra_headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(10) as pool:
            jobs = list(pool.map(lambda _: create("key-1"), range(10)))
        assert len({j.id for j in jobs}) == 1
        assert {j.model_dump_json() for j in jobs} == {jobs[0].model_dump_json()}
        assert create("key-1").model_dump_json() == jobs[0].model_dump_json()
        assert create("key-2").id != jobs[0].id              # another key, another job
        with pytest.raises(openai.UnprocessableEntityError, match="Idempotency-Key"):
            create("key-1", suffix="different")
        assert len(client.fine_tuning.jobs.list(limit=100).data) == 2
    with in_process(fake_backend(), state, API_KEY) as server:  # restarted on the same state
        client = server.client()
        again = client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                               suffix="same",
                                               extra_headers={"Idempotency-Key": "key-1"})
        assert again.id == jobs[0].id and again.status == "validating_files"
        assert len(client.fine_tuning.jobs.list(limit=100).data) == 2


def test_an_idempotency_key_over_255_characters_is_refused_in_both_dialects(tmp_path):
    """Issue 25: a key of any length was stored (kept forever, once per request)."""
    with in_process(fake_backend(), tmp_path / "state", API_KEY) as server:
        client = server.client()
        training = upload(client, TEN)
        for key in ("k" * 256, "k" * 10_000):
            with pytest.raises(openai.BadRequestError) as e:
                client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                               extra_headers={"Idempotency-Key": key})
            assert_openai_error(e.value, 400, param="idempotency-key")
            response = server.http.post("fine-tunes", json={
                "model": "fake-base", "training_file": training.id}, headers={
                **server.headers, "Idempotency-Key": key})
            assert response.status_code == 400, response.text
        longest = {"Idempotency-Key": "k" * 255}
        job = client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                             extra_headers=longest)
        assert client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                              extra_headers=longest).id == job.id


def test_a_together_job_keeps_the_request_digest_of_its_private_keys(tmp_path):
    """An ``Idempotency-Key`` stored before the service took ``finetune`` and
    ``min_examples`` as arguments still matches: a Together job's digest covers the same
    request, its private keys as Together gave them."""
    import hashlib
    import json
    import sqlite3

    from semievol.server.store import Store

    state = tmp_path / "state"
    with in_process(fake_backend(), state, API_KEY) as server:
        training = upload(server.client(), TEN)
        body = {"model": "fake-base", "training_file": training.id, "learning_rate": 2e-4}
        headers = {**server.headers, "Idempotency-Key": "together-1"}
        job = server.http.post("fine-tunes", json=body, headers=headers).json()
    store = Store(state)
    record = store.job(job["id"])
    store.close()
    private = {k: record[k] for k in ("_finetune", "_from_checkpoint", "_min_examples")}
    request = {"model": "fake-base", "training_file": training.id, "validation_file": None,
               "hyperparameters": record["_requested_hyperparameters"], "seed": None,
               "suffix": None, "metadata": None, "private": private}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    with sqlite3.connect(state / "state.db") as db:
        stored = db.execute("SELECT digest FROM idempotency WHERE key = ?",
                            ("together-1",)).fetchall()
    assert stored == [(digest,)]
