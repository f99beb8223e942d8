"""Evolve a hosted model through the OpenAI API: no GPU, no torch.

    pip install semievol
    export OPENAI_API_KEY=...                      # never written to the run directory
    python examples/evolve_hosted.py DATA_DIR [BASE_URL]

Set BASE_URL to a `semievol serve` address (http://127.0.0.1:8000/v1) to try the very same
code against a local model for free. The run stops before any step that would pass
max_cost_usd; rerunning resumes and never starts a second fine-tuning job for a step.
"""
import sys

from semievol import RunConfig, load_backend
from semievol.pipeline import run
from semievol.report import summary

data = sys.argv[1]
base_url = sys.argv[2] if len(sys.argv) > 2 else None
out = "runs/hosted"
config = RunConfig(data=data, backend="openai", model="gpt-4o-mini-2024-07-18",
                   base_url=base_url, max_cost_usd=5.0)
backend = load_backend("openai", model=config.model, base_url=base_url,
                       workdir=f"{out}/backend", max_cost_usd=config.max_cost_usd)
print(summary(run(config, backend, out)))
