"""Every example runs as written (on the fake backend, or a `semievol serve --backend fake`,
where it would need a model or an API key)."""
import datetime
import json
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_python_api_example_runs_and_its_scripted_model_learns(tmp_path, capsys):
    module = runpy.run_path(str(EXAMPLES / "python_api_fake.py"))
    results = module["main"](tmp_path)
    assert "SemiEvol" in capsys.readouterr().out
    ev = results["eval"]
    assert ev["semievol"]["accuracy"] >= ev["sft"]["accuracy"] > ev["vanilla"]["accuracy"]


RUN_HERE = {"python_api_fake.py", "evolve_local.py", "evolve_hosted.py",
            "compare_open_commercial.py"}


def test_every_example_is_run_by_a_test_here():
    assert {path.name for path in EXAMPLES.glob("*.py")} == RUN_HERE


def test_local_example_runs_the_small_recipe(tmp_path, capsys):
    """evolve_local.py, on the fake backend in place of the model: the recipe `semievol run`
    uses on local models, not the paper's settings that collapsed on the 135M model."""
    from semievol import load_backend
    from semievol.config import RECIPES
    from semievol.demo import make_task

    module = runpy.run_path(str(EXAMPLES / "evolve_local.py"))
    out = tmp_path / "run"
    results = module["main"](str(make_task(tmp_path / "data")), out=str(out),
                             backend=load_backend("fake"))
    assert "SemiEvol" in capsys.readouterr().out and (out / "report.md").is_file()
    config = results["config"]
    assert (config["finetune"]["epochs"], config["per_class"], config["justify"]) == (
        RECIPES["small"]["epochs"], RECIPES["small"]["per_class"], RECIPES["small"]["justify"])


@pytest.mark.slow
def test_hosted_example_runs_against_semievol_serve(tmp_path, monkeypatch, capsys):
    """evolve_hosted.py as written, with BASE_URL a `semievol serve --backend fake`."""
    from test_server import API_KEY, running_server

    from semievol.demo import make_task

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    module = runpy.run_path(str(EXAMPLES / "evolve_hosted.py"))
    with running_server("fake", tmp_path / "state") as server:
        results = module["main"](str(make_task(tmp_path / "data")), server.url,
                                 out=str(tmp_path / "run"), model="fake-base")
    assert results["backend"] == "openai" and results["eval"]["semievol"]["n"] > 0
    assert results["models"]["warm"].startswith("ft:fake-base:")   # a fine-tuning job ran


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
        table = module["main"](str(data), tmp_path, server.url, "fake-base", quiet=True,
                               today=datetime.date(2026, 12, 3))
        rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:4]}
        assert rows == {"compare-llama": "together", "compare-gpt-oss": "together",
                        "compare-gpt-4o-mini": "openai"}
        for name, backend in rows.items():
            results = json.loads((tmp_path / name / "results.json").read_text())
            assert results["backend"] == backend and results["eval"]["semievol"]["n"] > 0
        assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
        # once OpenAI creates no fine-tuning jobs, the example leaves gpt-4o-mini out
        table = module["main"](str(data), tmp_path / "later", server.url, "fake-base",
                               quiet=True, today=datetime.date(2027, 1, 6))
    assert "gpt-4o-mini" not in table and "compare-gpt-oss" in table
    assert "leaving out gpt-4o-mini-2024-07-18" in capsys.readouterr().out
