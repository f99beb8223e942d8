"""Run and fine-tuning configuration: frozen dataclasses, validated on construction and saved
as JSON beside the results, so every run says exactly how it was made."""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .backends import registry
from .errors import ConfigError


View = Literal["shared", "mixed", "diverse"]
VIEWS = typing.get_args(View)

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


def arg(default=dataclasses.MISSING, help: str = "", **flag):
    """A field that ``semievol run`` sets by a flag (read by :mod:`semievol.arguments`):
    ``help`` is its documentation and the flag's help; ``flag`` says where the flag differs
    from ``--field-name`` (``flag``, ``metavar``, ``words``, ``choices``, ``aliases``)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class FinetuneConfig:
    """How one fine-tune is done. Defaults are the paper's (LoRA r=16 on all linear layers,
    lr 1e-4, 2 epochs, cosine schedule, warm-up ratio 0.1)."""

    epochs: float = arg(2, "fine-tuning epochs")
    learning_rate: float = arg(1e-4, "LoRA learning rate; OpenAI's fine-tuning takes "
                               "the multiplier instead", flag="lr")
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    batch_size: int = arg(8, "fine-tuning batch size")
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    max_length: int = 1024
    """Training examples longer than this many tokens are cut (local backend)."""
    seed: int = 0
    learning_rate_multiplier: float | None = arg(
        None, "OpenAI fine-tuning learning-rate multiplier (default: the API's choice)",
        flag="lr_multiplier")

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

    data: str = arg(help="directory with labeled, unlabeled and test files (.csv, .jsonl or "
                    ".parquet: question, options, answer), a Hugging Face datasets folder "
                    "(save_to_disk) with those splits, or hf://datasets/NAME[:CONFIG] (from "
                    "the datasets cache)")
    backend: str = arg("hf", lambda: "; ".join(f"{e.name}: {e.help}"
                                               for e in registry.BACKENDS.values()),
                       choices=registry.names)
    model: str | None = arg(None, "model reference (default: the backend's default)")
    n: int = arg(4, "collaborating inferences per question (--samples under torchrun, "
                 "whose parser takes --n for an abbreviation of its own options)",
                 aliases=("--samples",))
    k: int = arg(3, "retrieved labeled examples per question, for in-context "
                "propagation")
    theta: float = arg(0.5, "entropy percentile to keep: pseudo-labels whose entropy is "
                       "under this percentile of all entropies")
    rounds: int = arg(1, "rounds of mining and evolving")
    iwp: bool = arg(True, "in-weight propagation (warm-up fine-tune)")
    icp: bool = arg(True, "in-context propagation: show the inferences the retrieved labeled "
                    "examples")
    cl: bool = arg(True, "collaborative learning (one greedy inference instead)")
    adaptive_selection: bool = arg(True, "adaptive selection (keep every pseudo-label)",
                                   flag="as")
    per_class: bool = arg(False, "entropy percentile over all pseudo-labels or within each "
                          "class, see selection.py", flag="selection",
                          words={"global": False, "per-class": True})
    justify: Literal["model", "vote"] = arg(
        "model", "settle disagreements by self-justify, as the paper, or majority vote")
    views: View = arg("shared", "the collaborating inferences: n samples of one prompt (with "
                      "the retrieved examples when icp), half with and half without the "
                      "retrieved examples (two prompts per question), or each its own "
                      "prompt, seed and temperature")
    replay_labeled: bool = arg(False, "evolve on the labeled examples too, not only on the "
                               "selected pseudo-labels")
    auto_recipe: bool = False
    """Choose icp, justify, per_class and replay_labeled on the validation slice (recipe
    'auto'): the fields' own values are kept only where there is no slice."""
    validation: int | None = arg(
        None, "labeled examples held out to choose the final model (SFT or SemiEvol) and "
        "stop rounds (see guard.py); 0: none, the evolved model is final, as in the paper "
        "(default: 20% of the labeled set, 8 to 200, none under 16 labels)", metavar="N")
    refit: bool = arg(False, "after the guard's decision, run again on every label (the "
                      "validation slice too, in RUN_DIR/refit) and return that run's model of "
                      "the chosen kind, not itself validated: about twice the time")
    columns: str | None = arg(None, "the data's own column names: question=text,answer=label,"
                              "options=choices (an integer label with a ClassLabel feature "
                              "reads as its class name; see data.load_task)",
                              metavar="FIELD=COLUMN,...")
    limit_labeled: int | None = arg(None, "use the first N labeled items", metavar="N")
    limit_unlabeled: int | None = arg(None, "use the first N unlabeled items", metavar="N")
    limit_test: int | None = arg(None, "use the first N test items", metavar="N")
    seed: int = arg(0, "random seed, of the fine-tunes too")
    temperature: float = arg(1.0, "sampling temperature of the collaborating inferences, as "
                             "in the authors' code")
    max_tokens: int = arg(32, "max tokens per answer")
    prompt_style: Literal["text", "letter"] = arg(
        "text", "answer with the option's text (best for small models) or the paper's "
        "'Answer: X'")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={
        "help": "fine-tuning", "fields": ("epochs", "learning_rate",
                                          "learning_rate_multiplier", "batch_size")})
    evolve_finetune: FinetuneConfig | None = arg(
        None, "fine-tuning of the evolve step; None: as finetune", prefix="evolve-",
        lead="the evolve step's ", fields=("learning_rate", "epochs"))
    base_url: str | None = arg(None, "API base URL of a hosted backend (e.g. a `semievol "
                               "serve`: http://127.0.0.1:8000/v1, which speaks OpenAI's and "
                               "Together's API; for tinker the server root, "
                               "http://127.0.0.1:8000)")
    max_cost_usd: float | None = arg(None, "stop before a step that would pass this cost")
    generation_batch: int = arg(16, "questions per generation call, each with its n samples")

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
        _check_choices(self)
        for name in ("limit_labeled", "limit_unlabeled", "limit_test"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1")
        _check(self.max_cost_usd is None or self.max_cost_usd >= 0, "max_cost_usd must be >= 0")
        _check(self.validation is None or self.validation >= 0, "validation must be >= 0")

    @classmethod
    def recipe(cls, name: str, **fields) -> "RunConfig":
        """A config with recipe ``name``'s settings, and ``fields`` over them:
        ``RunConfig.recipe("small", data="my_task")`` is what ``semievol run --data
        my_task`` runs on the hf backend. ``finetune`` and ``evolve_finetune`` may be dicts
        of some of their fields, which go over the recipe's (``{"epochs": 3}``); the evolve
        step's over ``finetune``. The command line's flags come here (``semievol.cli``)."""
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}: one of {', '.join(RECIPES)}")
        settings = dict(RECIPES[name])
        tuning = {f.name for f in dataclasses.fields(FinetuneConfig)}
        tune = {k: settings.pop(k) for k in tuning & settings.keys()}
        evolve = {k: settings.pop(f"evolve_{k}") for k in tuning if f"evolve_{k}" in settings}
        finetune, evolve_ft = fields.pop("finetune", {}), fields.pop("evolve_finetune", {})
        if isinstance(finetune, dict):
            finetune = FinetuneConfig(**{**tune, **finetune})
        if isinstance(evolve_ft, dict):
            evolve = {**evolve, **evolve_ft}
            evolve_ft = finetune.replace(**evolve) if evolve else None
        return cls(**{**settings, **fields, "finetune": finetune, "evolve_finetune": evolve_ft})

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


def _check_choices(config) -> None:
    """A Literal-typed field holds one of its choices."""
    for name, hint in typing.get_type_hints(type(config)).items():
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            _check(getattr(config, name) in choices,
                   f"{name} must be one of {', '.join(map(repr, choices))}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
