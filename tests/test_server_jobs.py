"""The fine-tuning worker of `semievol serve` (``semievol/server/jobs.py``), in process
(TestClient), where a test can hold a job in ``running``: cancellation while the API stays
responsive, and the recovery of a job that was running when the server died."""
from __future__ import annotations

import time

from serverkit import GatedBackend, create_job, fake_backend, in_process, job_status


def test_cancel_queued_and_running_jobs_while_the_api_stays_responsive(tmp_path):
    backend = GatedBackend()
    with in_process(backend, tmp_path / "state") as server:
        http = server.http
        first, second = create_job(http), create_job(http)
        assert backend.started.wait(10)
        assert job_status(http, first) == "running"
        assert job_status(http, second, until="queued") == "queued"
        t0 = time.monotonic()  # training holds the backend; the API still answers at once
        assert http.get("fine_tuning/jobs").status_code == 200
        assert http.get(f"fine_tuning/jobs/{first}/events").status_code == 200
        assert time.monotonic() - t0 < 2

        assert http.post(f"fine_tuning/jobs/{second}/cancel").json()["status"] == "cancelled"
        assert http.post(f"fine_tuning/jobs/{first}/cancel").json()["status"] == "cancelled"
        backend.gate.set()
        third = create_job(http)
        assert job_status(http, third, until="succeeded") == "succeeded"
        assert job_status(http, first) == "cancelled"  # its training ended but was thrown away
        jobs = {j["id"]: j for j in http.get("fine_tuning/jobs").json()["data"]}
        assert jobs[first]["fine_tuned_model"] is None
        assert jobs[second]["fine_tuned_model"] is None
        models = [m["id"] for m in http.get("models").json()["data"]]
        assert models == ["fake-base", jobs[third]["fine_tuned_model"]]
        again = http.post(f"fine_tuning/jobs/{third}/cancel")
        assert again.status_code == 400 and again.json()["error"]["param"]


def test_a_job_running_when_the_server_died_is_resumed_once_then_failed(tmp_path):
    state = tmp_path / "state"
    with in_process(fake_backend(), state) as server:
        job_id = create_job(server.http)
        assert job_status(server.http, job_id, until="succeeded") == "succeeded"
        model = server.http.get(f"fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]

    def die_while_running():
        from semievol.server.store import Store

        store = Store(state)
        store.update_job(job_id, {"status": "running", "fine_tuned_model": None,
                                  "finished_at": None})
        store.close()

    die_while_running()
    with in_process(fake_backend(), state) as server:
        http = server.http
        assert job_status(http, job_id, until="succeeded") == "succeeded"
        job = http.get(f"fine_tuning/jobs/{job_id}").json()
        assert job["fine_tuned_model"] == model and "_resumed" not in job
        events = http.get(f"fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
        assert any(e["level"] == "warn" and "re-queued" in e["message"]
                   for e in events["data"])

    die_while_running()
    with in_process(fake_backend(), state) as server:
        job = server.http.get(f"fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "server_stopped"
