"""results.json: what a run made and scored, built once when it finishes, written once,
and read back through the same type by whoever reports it (``semievol report`` and
``compare``, export's model card, the dry-run estimate)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .rundir import atomic_write_json

NAME = "results.json"


@dataclass(frozen=True)
class Results:
    """One run's results; the fields are results.json's keys, in its order."""

    run_id: str
    task: str
    backend: str
    base_model: str
    models: dict
    """``base``, ``warm`` (None without IWP), ``evolved`` (the last round's) and ``final``
    (the model the run hands back): model references."""
    eval: dict
    """Test scores of ``vanilla``, ``sft`` (None without IWP), ``semievol`` and ``final``."""
    unlabeled: dict
    """Mining's counts and, where the unlabeled answers were known, pseudo-label accuracy."""
    rounds: list
    sizes: dict
    usage: dict
    usage_by_stage: dict
    timings_s: dict
    runtime: dict
    config: dict
    validation: dict
    """The guard's slice, each model's scores on it, its comparisons and evidence."""
    final: str
    """Which model is final: "semievol", or the fallback ("sft", "vanilla")."""
    refit: dict | None = None
    """Where the final model was made again on every label (``--refit``)."""
    recipe: dict | None = None
    """What recipe 'auto' chose, and what choosing cost."""

    OLDER = {"validation": {"n": 0, "ids": [], "scores": {}, "chosen": None, "samples": None,
                            "comparisons": [], "evidence": {}}, "final": None}
    """What results.json written before the guard reads as: a run without a slice."""

    def to_json(self) -> dict:
        """results.json's content (``refit`` and ``recipe`` only where they are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None or f.name not in ("refit", "recipe")}

    def write(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / NAME, self.to_json())

    @classmethod
    def of(cls, data: "Results | dict") -> "Results":
        """From results.json's content (or the Results itself)."""
        if isinstance(data, Results):
            return data
        data = {**cls.OLDER, **data}
        # a slice judged by an older semievol, on accuracy: no comparisons, no evidence
        data["validation"] = {"comparisons": None, **data["validation"]}
        return cls(**data)

    @classmethod
    def read(cls, run_dir: Path) -> "Results":
        return cls.of(json.loads((Path(run_dir) / NAME).read_text()))
