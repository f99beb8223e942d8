"""The round trip through a real Label Studio server (`make labelstudio`: its own venv,
SQLite): `semievol suggest` writes tasks with the run's pre-annotations and the labeling
config; a project is made with that config and the tasks imported through the API,
predictions included; a simulated annotator answers each task from the gold answers
through the API; the export goes through `semievol import-labels`; and `semievol run` on
the grown data starts a new run directory (the fake backend, for speed)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from conftest import REPO, require
from test_suggest import OPTIONS, write_task

from semievol import cli
from semievol.data import load_task

LS = REPO / ".ls-venv" / "bin" / "label-studio"
TEMPLATE = REPO / ".ls-venv" / "template"
"""A data directory whose database `make labelstudio` migrated: copied, a server starts in
seconds, not the minute its migrations take."""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A Label Studio server on a free loopback port, its user and legacy API token made
    at start (``--user-token``, ``--enable-legacy-api-token``): no interactive step."""
    require(LS.exists(), "Label Studio is not set up (.ls-venv is missing): run `make labelstudio`")
    home = tmp_path_factory.mktemp("label-studio")
    if TEMPLATE.is_dir():
        shutil.copytree(TEMPLATE, home, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".env"))  # its secret key: its own
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(home), "LATEST_VERSION_CHECK": "false",
           "LABEL_STUDIO_LATEST_VERSION_CHECK": "false", "OMP_NUM_THREADS": "1"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [str(LS), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(home), "--username", "annotator@semievol.test",
         "--password", secrets.token_hex(8), "--user-token", token,
         "--enable-legacy-api-token"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # without the template, migrations: ~1 min on two cores
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"Label Studio did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=60)
    yield client
    client.close()
    server.terminate()
    server.wait(30)
    log.close()


def test_suggest_label_export_import_and_run_again(label_studio, tmp_path, monkeypatch):
    api = label_studio
    data = write_task(tmp_path / "task")
    gold = load_task(data).hidden
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--data", str(data), "--backend", "fake", "--quiet"]) == 0
    first = tmp_path / "runs" / "task-fake"
    run_id = json.loads((first / "manifest.json").read_text())["run_id"]
    assert cli.main(["suggest", str(first), "-k", "6", "--out", str(tmp_path / "tasks.json")]) == 0

    project = api.post("/api/projects", json={
        "title": "semievol suggestions", "label_config": (tmp_path / "tasks.xml").read_text()})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    imported = api.post(f"/api/projects/{pid}/import",
                        json=json.loads((tmp_path / "tasks.json").read_text()))
    assert imported.status_code == 201, imported.text
    assert imported.json()["task_count"] == 6 and imported.json()["prediction_count"] == 6

    tasks = api.get("/api/tasks", params={"project": pid, "page_size": 100, "fields": "all"})
    tasks = tasks.json()["tasks"]
    assert len(tasks) == 6
    for task in tasks:
        shown = api.get(f"/api/tasks/{task['id']}").json()
        (pred,) = shown["predictions"]  # the pre-annotation, as Label Studio keeps it
        assert pred["model_version"] == run_id and 0 < pred["score"] <= 1
        answer = OPTIONS["ABC".index(gold[task["data"]["item_id"]])]
        made = api.post(f"/api/tasks/{task['id']}/annotations", json={"result": [
            {"from_name": "answer", "to_name": "question", "type": "choices",
             "value": {"choices": [answer]}}]})
        assert made.status_code == 201, made.text

    export = api.get(f"/api/projects/{pid}/export", params={"exportType": "JSON"})
    assert export.status_code == 200, export.text
    (tmp_path / "export.json").write_bytes(export.content)
    labeled_before = len(load_task(data).labeled)
    assert cli.main(["import-labels", str(tmp_path / "export.json"), "--data", str(data)]) == 0
    grown = load_task(data)
    added = {t["data"]["item_id"] for t in tasks}
    assert len(grown.labeled) == labeled_before + 6
    assert {ex.id: ex.answer for ex in grown.labeled if ex.id in added} == {i: gold[i] for i in added}
    assert not added & {ex.id for ex in grown.unlabeled}
    before = {p.name: p.read_bytes() for p in data.glob("*.csv")}
    assert cli.main(["import-labels", str(tmp_path / "export.json"), "--data", str(data)]) == 0
    assert {p.name: p.read_bytes() for p in data.glob("*.csv")} == before  # once only

    assert cli.main(["run", "--data", str(data), "--backend", "fake", "--quiet"]) == 0
    again = json.loads((tmp_path / "runs" / "task-fake-2" / "results.json").read_text())
    assert again["sizes"]["labeled"] == labeled_before + 6 and again["run_id"] != run_id
    assert json.loads((first / "results.json").read_text())["sizes"]["labeled"] == labeled_before
