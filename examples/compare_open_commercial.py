"""The same task, the same method: an open model and a commercial one, both hosted.

    pip install "semievol[together]"
    export TOGETHER_API_KEY=... OPENAI_API_KEY=...     # never written to the run directories
    python examples/compare_open_commercial.py DATA_DIR [BASE_URL MODEL]

Runs SemiEvol on Llama-3.1-8B-Instruct through the Together API and on gpt-4o-mini through
the OpenAI API (each stopping before a step that would pass $5), then prints `semievol
compare`'s table of the two runs and writes compare.png. The same comparison from the shell:

    semievol run --data DATA_DIR --backend together --out runs/compare-together
    semievol run --data DATA_DIR --backend openai --out runs/compare-openai
    semievol compare runs/compare-together runs/compare-openai

OpenAI is closing self-serve fine-tuning (no new jobs for anyone from 2027-01-06); where it
already refuses your organisation, the openai run stops and says so.

Give BASE_URL and MODEL (a `semievol serve` address and the model it serves) to run both
backends, each in its own API dialect, against that one local server for free (so without a
budget: a local model has no price): the tests do so with `semievol serve --backend fake`.
"""
import sys
from pathlib import Path

from semievol import RunConfig, load_backend
from semievol.pipeline import run
from semievol.report import compare

HOSTED = {"together": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference",
          "openai": "gpt-4o-mini-2024-07-18"}


def main(data: str, out: Path, base_url: str | None = None, model: str | None = None,
         quiet: bool = False) -> str:
    runs = []
    for backend_name, hosted in HOSTED.items():
        run_dir = out / f"compare-{backend_name}"
        config = RunConfig(data=data, backend=backend_name, model=model or hosted,
                           base_url=base_url, max_cost_usd=None if base_url else 5.0)
        backend = load_backend(backend_name, model=config.model, base_url=base_url,
                               workdir=run_dir / "backend", max_cost_usd=config.max_cost_usd,
                               quiet=quiet)
        run(config, backend, run_dir, quiet=quiet)
        runs.append(run_dir)
    table = compare(runs, out / "compare.png")
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1], Path("runs"), *sys.argv[2:4])
