"""The example a user copies first runs, and SemiEvol helps its scripted model."""
import json
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_python_api_example_runs(tmp_path, capsys):
    module = runpy.run_path(str(EXAMPLES / "python_api_fake.py"))
    results = module["main"](tmp_path)
    assert "SemiEvol" in capsys.readouterr().out
    ev = results["eval"]
    assert ev["semievol"]["accuracy"] >= ev["sft"]["accuracy"] > ev["vanilla"]["accuracy"]


def test_every_example_compiles():
    for path in EXAMPLES.glob("*.py"):
        compile(path.read_text(), str(path), "exec")


@pytest.mark.slow
def test_compare_open_commercial_runs_both_hosted_backends(tmp_path, monkeypatch, capsys):
    """The example against one `semievol serve --backend fake`: the openai backend in
    OpenAI's dialect, the together backend in Together's, and `compare` over the two runs
    (same results.json schema)."""
    from test_server import API_KEY, running_server

    from semievol.demo import make_task

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("TOGETHER_API_KEY", API_KEY)
    data = make_task(tmp_path / "data")
    module = runpy.run_path(str(EXAMPLES / "compare_open_commercial.py"))
    with running_server("fake", tmp_path / "state") as server:
        table = module["main"](str(data), tmp_path, server.url, "fake-base", quiet=True)
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:3]}
    assert rows == {"compare-together": "together", "compare-openai": "openai"}
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("together", "openai"):
        results = json.loads((tmp_path / f"compare-{name}" / "results.json").read_text())
        assert results["backend"] == name and results["eval"]["semievol"]["n"] > 0
