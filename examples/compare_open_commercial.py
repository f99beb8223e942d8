"""The same task, the same method, an open and a commercial model side by side.

    python examples/compare_open_commercial.py DATA_DIR

Runs SemiEvol with the local LoRA backend and with the OpenAI backend (OPENAI_API_KEY set),
then prints the comparison table and writes compare.png.
"""
import sys
from pathlib import Path

from semievol import RunConfig, load_backend
from semievol.pipeline import run
from semievol.report import compare

data = sys.argv[1]
runs = []
for backend_name in ("hf", "openai"):
    out = Path(f"runs/compare-{backend_name}")
    backend = load_backend(backend_name, workdir=out / "backend")
    run(RunConfig(data=data, backend=backend_name), backend, out)
    runs.append(out)
print(compare(runs, Path("compare.png")))
