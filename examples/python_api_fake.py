"""The Python API on the fake backend: SemiEvol end to end in about a second, no model.

A scripted "model" routes support tickets: it answers from its training data when it can
and otherwise guesses, with low entropy when it is sure. Swap `load_backend("fake", ...)`
for `load_backend("hf")` or `load_backend("openai")` and nothing else changes.

    python examples/python_api_fake.py [RUN_DIR]
"""
import sys
import tempfile
from pathlib import Path

from semievol import Generation, RunConfig, load_backend
from semievol.demo import PROBLEMS, make_task
from semievol.pipeline import run
from semievol.report import summary


def ticket_model(call):
    """Knows a ticket's team if it was trained on a ticket with the same problem phrase."""
    ticket = call.user.split("Ticket:")[-1].lower()
    for example in call.trained:
        for team, phrases in PROBLEMS.items():
            if any(p.lower() in ticket and p.lower() in example[-2]["content"].lower() for p in phrases):
                return Generation(example[-1]["content"], ("team",), (-0.01 * (len(ticket) % 50),))
    guess = ["billing", "shipping", "technical"][(len(ticket) + call.sample) % 3]
    return Generation(guess, ("team",), (-1.5,))


def main(out: Path) -> dict:
    data = make_task(out / "data")
    backend = load_backend("fake", rule=ticket_model)
    results = run(RunConfig(data=str(data), backend="fake"), backend, out / "run", quiet=True)
    print(summary(results))
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
