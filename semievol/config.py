"""Run and fine-tuning configuration: frozen dataclasses, validated on construction and saved
as JSON beside the results, so every run says exactly how it was made."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .backends import registry
from .errors import ConfigError


VIEWS = ("shared", "mixed", "diverse")

SCHEMA = 1
"""The version of config.json's layout (written as ``"schema"``)."""

RESUMABLE = frozenset({"max_cost_usd", "generation_batch"})
"""RunConfig fields that do not change a run's results, so a resumed run may change them:
raise the budget that stopped it, or change how many questions go in a generation call."""

EXTENDABLE = frozenset({"rounds"})
"""RunConfig fields a resumed run may change although they change its results: rounds are
made one after another, so a run resumed with more of them goes on from its last."""

RECIPES = {
    "small": {"epochs": 4, "evolve_epochs": 2, "learning_rate": 4e-4, "prompt_style": "text",
              "justify": "vote", "per_class": True, "icp": False, "views": "shared",
              "replay_labeled": True},
    "paper": {"epochs": 2, "learning_rate": 1e-4, "prompt_style": "letter", "justify": "model",
              "per_class": False, "icp": True, "views": "shared", "replay_labeled": False},
}
RECIPES["auto"] = {**RECIPES["small"], "auto_recipe": True}
"""Settings that go together (``RunConfig.recipe``; ``semievol run --recipe``). 'small' is
what worked for the embedded 135M model on fpb: the paper's settings made it answer
'neutral' to everything, its self-justify said 'neutral' to 206 of 209 disagreements, and a
global entropy threshold kept only 'neutral' pseudo-labels; benchmarks/choose_recipe.py
chose the rest on left-out labeled examples. 'paper' is the paper's (the bare ``RunConfig``
defaults). 'auto' starts from 'small' and lets the validation slice overrule its
retrieval, how disagreements are settled and labeled replay where another way is
significantly better, and choose the selection (see guard.py and
``RunConfig.auto_recipe``). ``evolve_epochs``, where given, are the evolve step's."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How one fine-tune is done. Defaults are the paper's (LoRA r=16 on all linear layers,
    lr 1e-4, 2 epochs, cosine schedule, warm-up ratio 0.1)."""

    epochs: float = 2
    learning_rate: float = 1e-4
    """LoRA learning rate (local and Together). The OpenAI backend uses
    ``learning_rate_multiplier``."""
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    batch_size: int = 8
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    max_length: int = 1024
    """Training examples longer than this many tokens are cut (local backend)."""
    seed: int = 0
    learning_rate_multiplier: float | None = None
    """OpenAI fine-tuning only; None lets the API choose."""

    def __post_init__(self):
        _check_finite(self)
        _check(self.epochs > 0, "epochs must be > 0")
        _check(self.learning_rate > 0, "learning_rate must be > 0")
        _check(self.lora_rank >= 1, "lora_rank must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _check(0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)")
        _check(self.max_length >= 8, "max_length must be >= 8")

    def replace(self, **changes) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a `semievol run` does (saved as config.json)."""

    data: str
    backend: str = "hf"
    model: str | None = None
    """Base model reference; None means the backend's default."""
    n: int = 4
    """Collaborating inferences per unlabeled question."""
    k: int = 3
    """Retrieved labeled examples per unlabeled question (in-context propagation)."""
    theta: float = 0.5
    """Keep pseudo-labels whose entropy is under this percentile of all entropies."""
    rounds: int = 1
    iwp: bool = True
    icp: bool = True
    cl: bool = True
    adaptive_selection: bool = True
    per_class: bool = False
    """Take the entropy percentile within each pseudo-label class (see selection.py)."""
    justify: str = "model"
    """How disagreements are settled: "model" (self-justify, the paper) or "vote"."""
    views: str = "shared"
    """The n collaborating inferences: "shared" (n samples of one prompt, with the retrieved
    examples when icp), "mixed" (half with the retrieved examples, half without: two
    prompts per question) or "diverse" (each its own prompt, seed and temperature)."""
    replay_labeled: bool = False
    """Evolve on the labeled examples as well as the selected pseudo-labels."""
    auto_recipe: bool = False
    """Choose icp, justify, per_class and replay_labeled on the validation slice (recipe
    'auto'): the fields' own values are kept only where there is no slice."""
    validation: int | None = None
    """Labeled examples held out as the validation slice, which picks the final model (SFT
    or SemiEvol) and stops rounds (see guard.py). None: 20% of the labeled set, at least 8
    and at most 200, none under 16 labels; 0: no validation slice (the evolved model is
    final, as in the paper)."""
    refit: bool = False
    """After the guard's decision, give the validation slice back: run again on every label
    (in ``RUN_DIR/refit``, without a slice) and hand back that run's model of the kind the
    guard chose. It was not itself validated, and it costs a second run."""
    columns: str | None = None
    """Which columns hold question, answer, options and id when the data names them
    otherwise: "question=text,answer=label,options=choices" (see data.load_task)."""
    limit_labeled: int | None = None
    limit_unlabeled: int | None = None
    limit_test: int | None = None
    seed: int = 0
    temperature: float = 1.0
    """Sampling temperature of the collaborating inferences (the authors' code: 1.0)."""
    max_tokens: int = 32
    prompt_style: str = "text"
    """"text": the model answers with the option's text (best for small models);
    "letter": the paper's "Answer: X" format."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evolve_finetune: FinetuneConfig | None = None
    """Fine-tuning of the evolve step; None means the same as ``finetune``."""
    base_url: str | None = None
    max_cost_usd: float | None = None
    generation_batch: int = 16
    """Questions per generation call (each with its n samples)."""

    def __post_init__(self):
        _check_finite(self)
        _check(self.backend in registry.BACKENDS, f"unknown backend {self.backend!r}: "
               f"choose {', '.join(registry.names())}")
        _check(1 <= self.n <= 16, "n must be between 1 and 16")
        _check(0 <= self.k <= 16, "k must be between 0 and 16")
        _check(0 < self.theta <= 1, "theta must be in (0, 1]")
        _check(self.rounds >= 1, "rounds must be >= 1")
        _check(self.temperature >= 0, "temperature must be >= 0")
        _check(self.max_tokens >= 1, "max_tokens must be >= 1")
        _check(self.generation_batch >= 1, "generation_batch must be >= 1")
        _check(self.prompt_style in ("text", "letter"), "prompt_style must be 'text' or 'letter'")
        _check(self.justify in ("model", "vote"), "justify must be 'model' or 'vote'")
        _check(self.views in VIEWS, f"views must be one of {', '.join(VIEWS)}")
        for name in ("limit_labeled", "limit_unlabeled", "limit_test"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1")
        _check(self.max_cost_usd is None or self.max_cost_usd >= 0, "max_cost_usd must be >= 0")
        _check(self.validation is None or self.validation >= 0, "validation must be >= 0")

    @classmethod
    def recipe(cls, name: str, **fields) -> "RunConfig":
        """A config with recipe ``name``'s settings, and ``fields`` over them:
        ``RunConfig.recipe("small", data="my_task")`` is what ``semievol run --data
        my_task`` runs on the hf backend."""
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}: one of {', '.join(RECIPES)}")
        settings = dict(RECIPES[name])
        finetune = FinetuneConfig(epochs=settings.pop("epochs"),
                                  learning_rate=settings.pop("learning_rate"))
        evolve_epochs = settings.pop("evolve_epochs", None)
        evolve = finetune.replace(epochs=evolve_epochs) if evolve_epochs else None
        settings.update(finetune=finetune, evolve_finetune=evolve)
        return cls(**{**settings, **fields})

    @property
    def evolve_ft(self) -> FinetuneConfig:
        return self.evolve_finetune or self.finetune

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """From :meth:`to_dict` or config.json; fields it lacks take their defaults."""
        data = dict(data)
        schema = data.pop("schema", SCHEMA)
        if schema > SCHEMA:
            raise ConfigError(f"config: schema {schema} is newer than this semievol reads "
                              f"({SCHEMA}): upgrade semievol")
        try:
            data["finetune"] = FinetuneConfig(**data.get("finetune", {}))
            if data.get("evolve_finetune") is not None:
                data["evolve_finetune"] = FinetuneConfig(**data["evolve_finetune"])
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

    def save(self, path: Path) -> None:
        from .rundir import atomic_write_text

        atomic_write_text(path, json.dumps({"schema": SCHEMA, **self.to_dict()}, indent=2,
                                           allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _check_finite(config) -> None:
    """No inf or NaN in a number field: every check below would pass inf (``lr > 0``), and
    config.json must stay JSON."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        _check(not isinstance(value, float) or math.isfinite(value),
               f"{f.name} must be a finite number, not {value}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
