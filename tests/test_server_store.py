"""The state of `semievol serve` (``semievol/server/store.py``) as the server meets it: damaged
records named and left out while the rest serves, what a kill leaves swept at start, an
unreadable database named, the old JSON layout imported. In process (TestClient); what
the server logs is read from ``caplog``."""
from __future__ import annotations

import json
import logging
import sqlite3

import openai
import pytest
from serverkit import (API_KEY, TEN, create_job, fake_backend, in_process, job_status, jsonl,
                       upload, wait)


def test_damaged_state_is_named_and_the_rest_keeps_serving(tmp_path):
    """Records damaged on disk (a job that is null, a truncated model, an event of the wrong
    type, a file without created_at, a file whose bytes are gone): each is named, never a
    path, and every other request still works, across a restart."""
    state = tmp_path / "state"
    with in_process(fake_backend(), state) as server:
        http = server.http
        good, bad = create_job(http), create_job(http)
        for job_id in (good, bad):
            assert job_status(http, job_id, until="succeeded") == "succeeded"
        lost = http.post("files", files={"file": ("x.jsonl", jsonl(TEN))},
                         data={"purpose": "fine-tune"}).json()["id"]
        models = {m["id"] for m in http.get("models").json()["data"]}
    db = sqlite3.connect(state / "state.db")
    bad_model = http_model = next(m for m in models if m.startswith("ft:"))
    with db:
        db.execute("UPDATE jobs SET record = 'null' WHERE id = ?", (bad,))
        db.execute("UPDATE models SET record = '{\"ref\": ' WHERE name = ?", (bad_model,))
        db.execute("UPDATE events SET record = '[1, 2]' WHERE seq = 1")
        db.execute("UPDATE files SET record = json_remove(record, '$.created_at') WHERE id = ?",
                   (lost,))
    db.close()
    some_file = next(f for f in (state / "files").glob("file-*.bin") if f.stem != lost)
    some_file.unlink()
    with in_process(fake_backend(), state) as server:
        http = server.http
        response = http.get(f"fine_tuning/jobs/{bad}")
        assert response.status_code == 500 and bad in response.json()["error"]["message"]
        listed = [j["id"] for j in http.get("fine_tuning/jobs").json()["data"]]
        assert good in listed and bad not in listed
        files = http.get("files")
        assert files.status_code == 200 and lost not in [f["id"] for f in files.json()["data"]]
        gone = some_file.stem
        content = http.get(f"files/{gone}/content")
        assert content.status_code == 500 and gone in content.json()["error"]["message"]
        assert str(tmp_path) not in content.text and ".bin" not in content.text
        price = http.post("fine-tunes/estimate-price", json={"training_file": gone})
        assert price.status_code == 500 and gone in price.json()["error"]["message"]
        assert str(tmp_path) not in price.text
        job = http.post("fine_tuning/jobs", json={"model": "fake-base", "training_file": gone})
        failed = job_status(http, job.json()["id"], until="failed")
        error = http.get(f"fine_tuning/jobs/{job.json()['id']}").json()["error"]
        assert failed == "failed" and gone in error["message"], error
        assert http.get(f"fine_tuning/jobs/{good}/events").status_code == 200
        served = {m["id"] for m in http.get("models").json()["data"]}
        assert http_model not in served and served  # the damaged model is left out, not fatal
        assert http.get(f"fine_tuning/jobs/{good}").json()["status"] == "succeeded"


def test_records_of_the_wrong_shape_are_named_and_left_out_while_the_server_serves(tmp_path,
                                                                                   caplog):
    """Well-formed JSON of the wrong shape (issue 25, break 2): a job created "yesterday",
    one "paused", one without hyperparameters, a file created at null. The server starts,
    both dialects list the rest, and a request for a bad record names it, as does the log."""
    from semievol.server.store import new_id

    caplog.set_level(logging.INFO)
    state = tmp_path / "state"
    with in_process(fake_backend(), state, API_KEY) as server:
        client = server.client()
        training = upload(client, TEN)
        good = wait(client, client.fine_tuning.jobs.create(
            model="fake-base", training_file=training.id).id)
        assert good.status == "succeeded"
    bad = {"created_at": new_id("ftjob"), "status": new_id("ftjob"),
           "hyperparameters": new_id("ftjob")}
    bad_file = new_id("file")
    db = sqlite3.connect(state / "state.db")
    with db:
        for edit, job_id in [("json_set(record, '$.created_at', 'yesterday')", bad["created_at"]),
                             ("json_set(record, '$.status', 'paused')", bad["status"]),
                             ("json_remove(record, '$.hyperparameters')", bad["hyperparameters"])]:
            db.execute(f"INSERT INTO jobs SELECT ?, json_set({edit}, '$.id', ?) FROM jobs "
                       "WHERE id = ?", (job_id, job_id, good.id))
        db.execute("INSERT INTO files SELECT ?, json_set(record, '$.id', ?, '$.created_at', "
                   "json('null')) FROM files WHERE id = ?", (bad_file, bad_file, training.id))
    db.close()
    with in_process(fake_backend(), state, API_KEY) as server:
        client = server.client()
        assert [j.id for j in client.fine_tuning.jobs.list(limit=100)] == [good.id]
        assert [f.id for f in client.files.list()] == [training.id]
        together = server.http.get("fine-tunes", headers=server.headers)
        assert together.status_code == 200
        assert [j["id"] for j in together.json()["data"]] == [good.id]
        for field, job_id in bad.items():
            with pytest.raises(openai.InternalServerError) as e:
                client.fine_tuning.jobs.retrieve(job_id)
            message = e.value.body["message"]
            assert job_id in message and field in message, message
        with pytest.raises(openai.InternalServerError, match=bad_file):
            client.files.retrieve(bad_file)
        assert client.fine_tuning.jobs.retrieve(good.id).status == "succeeded"
        assert client.chat.completions.create(model=good.fine_tuned_model, messages=[
            {"role": "user", "content": "hi"}]).choices
    log = caplog.text
    assert all(name in log for name in [*bad.values(), bad_file]), log


def test_what_a_kill_leaves_in_files_is_swept_at_start(tmp_path, caplog):
    """Issue 25, break 4: a kill -9 during an upload leaves its ``.upload-*`` temporary, and
    one between the rename and the commit leaves ``files/file-*.bin`` without a row. The
    next start removes both and keeps every file that has its row."""
    from semievol.server.store import new_id

    caplog.set_level(logging.INFO)
    state = tmp_path / "state"
    with in_process(fake_backend(), state, API_KEY) as server:
        kept = upload(server.client(), TEN)
    orphans = [state / "files" / f"{new_id('file')}.bin", state / "files" / ".upload-x1b2c3"]
    for orphan in orphans:
        orphan.write_bytes(jsonl(TEN))
    with in_process(fake_backend(), state, API_KEY) as server:
        client = server.client()
        assert not any(orphan.exists() for orphan in orphans)
        assert [f.id for f in client.files.list()] == [kept.id]
        assert client.files.content(kept.id).content == jsonl(TEN)
    assert all(orphan.name in caplog.text for orphan in orphans)


def test_an_unreadable_state_database_is_named(tmp_path):
    from semievol.server.store import DamagedRecord, Store

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(DamagedRecord, match="state.db"):
        Store(tmp_path / "state")


def test_a_state_directory_of_the_json_layout_is_imported(tmp_path):
    from semievol.server.store import Store, new_id

    state = tmp_path / "state"
    (state / "files").mkdir(parents=True)
    (state / "jobs").mkdir()
    job_id, file_id = new_id("ftjob"), new_id("file")
    hyper = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    job = {"id": job_id, "object": "fine_tuning.job", "created_at": 5, "status": "succeeded",
           "model": "fake-base", "training_file": file_id, "validation_file": None,
           "hyperparameters": hyper, "seed": 1, "metadata": None, "error": None,
           "fine_tuned_model": "ft:fake-base:semievol::x", "finished_at": 6,
           "trained_tokens": 10, "user_provided_suffix": None,
           "_requested_hyperparameters": hyper, "_base_ref": "fake-base",
           "_root_model": "fake-base", "_fine_tuned_model": "ft:fake-base:semievol::x"}
    (state / "jobs" / f"{job_id}.json").write_text(json.dumps(job))
    (state / "jobs" / f"{job_id}.events.json").write_text(json.dumps(
        [{"id": "ftevent-" + "a" * 24, "created_at": 5, "message": "done", "level": "info"}]))
    (state / "files" / f"{file_id}.json").write_text(json.dumps(
        {"id": file_id, "created_at": 4, "purpose": "fine-tune"}))
    (state / "models.json").write_text(json.dumps(
        {"ft:fake-base:semievol::x": {"ref": "r", "job": job_id, "base": "fake-base",
                                      "created": 6}}))
    store = Store(state)
    assert store.job(job_id) == job and store.file(file_id)["created_at"] == 4
    assert [e["message"] for e in store.events(job_id)] == ["done"]
    assert store.model("ft:fake-base:semievol::x")["ref"] == "r"
