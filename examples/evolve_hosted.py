"""Evolve a hosted model through the OpenAI API: no GPU, no torch.

    pip install semievol
    export OPENAI_API_KEY=...                      # never written to the run directory
    python examples/evolve_hosted.py DATA_DIR [BASE_URL]

Set BASE_URL to a `semievol serve` address (http://127.0.0.1:8000/v1) to try the very same
code against a local model for free (so without a budget: a local model has no price). On
OpenAI the run stops before any step that would pass max_cost_usd; rerunning resumes and
never starts a second fine-tuning job for a step.
"""
import sys

from semievol import RunConfig, load_backend
from semievol.pipeline import run, spent_usd
from semievol.report import summary


def main(data: str, base_url: str | None = None, out: str = "runs/hosted",
         model: str = "gpt-4o-mini-2024-07-18") -> dict:
    config = RunConfig.recipe("paper", data=data, backend="openai", model=model,
                              base_url=base_url, max_cost_usd=None if base_url else 5.0)
    backend = load_backend("openai", model=model, base_url=base_url, workdir=f"{out}/backend",
                           max_cost_usd=config.max_cost_usd, spent_usd=spent_usd(out))
    results = run(config, backend, out)
    print(summary(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
