"""The example a user copies first runs, and SemiEvol helps its scripted model."""
import runpy
from pathlib import Path

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
