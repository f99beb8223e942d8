"""The same task, the same method: open models and a commercial vendor's, all hosted.

    pip install "semievol[together]"
    export TOGETHER_API_KEY=... OPENAI_API_KEY=...     # never written to the run directories
    python examples/compare_open_commercial.py DATA_DIR [BASE_URL MODEL]

Runs SemiEvol on Meta's Llama-3.1-8B-Instruct and on OpenAI's open-weight gpt-oss-20b, both
fine-tuned through the Together API, and on gpt-4o-mini through OpenAI's own API while that
still exists (each stopping before a step that would pass $5), then prints `semievol
compare`'s table of the runs and writes compare.png. The same comparison from the shell:

    semievol run --data DATA_DIR --backend together --out runs/compare-llama
    semievol run --data DATA_DIR --backend together --model openai/gpt-oss-20b \\
        --out runs/compare-gpt-oss
    semievol run --data DATA_DIR --backend openai --out runs/compare-gpt-4o-mini
    semievol compare runs/compare-llama runs/compare-gpt-oss runs/compare-gpt-4o-mini

OpenAI creates no fine-tuning jobs for anyone from 2027-01-06, and gpt-4o-mini-2024-07-18
and every fine-tune built on it stop serving on 2027-01-14: from the first date this
example leaves gpt-4o-mini out and says so. gpt-oss-20b stays fine-tunable on Together.
Where Together serves a fine-tune only on a dedicated endpoint, that run stops after its
warm-up with the hardware and its price per minute; add ``--together-endpoint auto`` (here:
``endpoint="auto"``) to pay for one.

Give BASE_URL and MODEL (a `semievol serve` address and the model it serves) to run every
entry, each in its own API dialect, against that one local server for free (so without a
budget: a local model has no price): the tests do so with `semievol serve --backend fake`.
"""
import datetime
import sys
from pathlib import Path

from semievol import RunConfig, load_backend
from semievol.pipeline import run
from semievol.report import compare

HOSTED = [  # (run name, backend, model, the day it can no longer be fine-tuned)
    ("llama", "together", "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", None),
    ("gpt-oss", "together", "openai/gpt-oss-20b", None),
    ("gpt-4o-mini", "openai", "gpt-4o-mini-2024-07-18", datetime.date(2027, 1, 6)),
]


def main(data: str, out: Path, base_url: str | None = None, model: str | None = None,
         quiet: bool = False, today: datetime.date | None = None) -> str:
    today = today or datetime.date.today()
    runs = []
    for name, backend_name, hosted, until in HOSTED:
        if until is not None and today >= until:
            print(f"leaving out {hosted}: {backend_name} fine-tunes it no more since {until}")
            continue
        run_dir = out / f"compare-{name}"
        config = RunConfig(data=data, backend=backend_name, model=model or hosted,
                           base_url=base_url, max_cost_usd=None if base_url else 5.0)
        backend = load_backend(backend_name, model=config.model, base_url=base_url,
                               workdir=run_dir / "backend", max_cost_usd=config.max_cost_usd,
                               quiet=quiet)
        try:
            run(config, backend, run_dir, quiet=quiet)
        finally:
            backend.close()  # the dedicated endpoints a run made, if any
        runs.append(run_dir)
    table = compare(runs, out / "compare.png")
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1], Path("runs"), *sys.argv[2:4])
