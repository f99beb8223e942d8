"""``semievol export RUN_DIR``: the model card from a run's results, the hosted form
(card + the provider's model id), and the refusals. The real adapter (loaded with plain
peft, the same answers as the run) is checked on a real run in test_pipeline_hf.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from semievol import RunConfig, load_backend
from semievol.demo import make_task
from semievol.errors import BackendError, ConfigError
from semievol.export import export, push_to_hub
from semievol.pipeline import run

from conftest import need
from test_pipeline import ticket_rule


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    task = make_task(tmp / "data", sizes={"labeled": 40, "unlabeled": 48, "test": 24})
    out = tmp / "run"
    results = run(RunConfig(data=str(task), backend="fake", validation=8),
                  load_backend("fake", rule=ticket_rule), out, quiet=True)
    return out, results


def test_card_says_what_the_run_did(finished, tmp_path):
    run_dir, results = finished
    out = export(run_dir, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.json"]
    assert json.loads((out / "model.json").read_text()) == \
        {"provider": "fake", "model": results["models"]["final"], "base_model": "fake-base"}
    card = (out / "README.md").read_text()
    meta = card.split("---")[1]
    assert "base_model: fake-base" in meta and "- semievol" in meta
    assert f"value: {results['eval']['final']['accuracy']:.4f}" in meta
    sizes = results["sizes"]
    assert f"| labeled | {sizes['labeled']} |" in card and f"| test | {sizes['test']} |" in card
    for label in ("vanilla", "sft", "semievol"):
        assert f"{results['eval'][label]['accuracy']:.3f}" in card
    u = results["unlabeled"]
    assert f"selected: {u['selected']}" in card and f"consistent: {u['consistent']}" in card
    assert f"Final model: **{results['final']}**" in card
    comparison = results["validation"]["comparisons"][0]
    assert f"{comparison['candidate']} vs {comparison['incumbent']}" in card
    assert '"theta": 0.5' in card  # the recipe, whole


def test_refusals_name_the_problem(finished, tmp_path):
    run_dir, _ = finished
    with pytest.raises(ConfigError, match="has no results.json"):
        export(tmp_path, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        export(run_dir, tmp_path / "full")
    with pytest.raises(ConfigError, match="lives at the provider"):
        export(run_dir, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()  # nothing half written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_push_to_hub_offline_says_which_repo(finished, tmp_path, monkeypatch):
    """Offline the upload fails with the repository named; the folder it would upload is
    the exported one (checked above and in test_pipeline_hf.py)."""
    need("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export(finished[0], tmp_path / "model")
    with pytest.raises(BackendError, match="someone/evolved"):
        push_to_hub(out, "someone/evolved")


def test_cli_keeps_the_base_model_form_and_takes_a_run_dir(finished, tmp_path):
    run_dir, _ = finished
    done = subprocess.run([sys.executable, "-m", "semievol", "export", str(run_dir),
                           "--out", str(tmp_path / "m"), "--model", "sft"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "SemiEvol sft model" in (tmp_path / "m" / "README.md").read_text()
    wrong = subprocess.run([sys.executable, "-m", "semievol", "export", "no-such-model",
                            "--merge", "--out", str(tmp_path / "x")],
                           capture_output=True, text=True)
    assert wrong.returncode != 0 and "not a run directory" in wrong.stderr
