"""Flags read from a config's fields (semievol.arguments), on a small config of its own."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from semievol.arguments import add_arguments, read_arguments
from semievol.config import arg


@dataclass(frozen=True)
class Tuning:
    epochs: float = arg(2, "epochs")
    learning_rate: float = arg(1e-4, "learning rate", flag="lr")
    warmup: float = 0.1  # no help: no flag


@dataclass(frozen=True)
class Toy:
    data: str = arg(help="where the data is")
    n: int = arg(4, "samples")
    style: Literal["text", "letter"] = arg("text", "answer style")
    ablate: bool = arg(True, "the warm-up", flag="wu")
    refit: bool = arg(False, "run again")
    icp: bool = arg(False, "retrieval")
    per_class: bool = arg(False, "threshold scope", flag="selection",
                          words={"global": False, "per-class": True})
    limit: int | None = arg(None, "first N, 100% of them by default", metavar="N")
    tuning: Tuning = field(default_factory=Tuning, metadata={
        "help": "tuning", "fields": ("epochs", "learning_rate")})
    again: Tuning | None = arg(None, "second tuning", prefix="again-", lead="the second's ",
                               fields=("learning_rate",))
    hidden: int = 7


RECIPES = {"fast": {"icp": False, "per_class": True, "epochs": 1},
           "slow": {"icp": True, "per_class": False, "epochs": 9}}


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_arguments(p, Toy, **kw)
    return p


def test_flags_take_their_names_types_choices_and_defaults_from_the_fields():
    args = parser().parse_args(["--data", "d"])
    assert vars(args) == {"data": "d", "n": 4, "style": "text", "ablate": True, "refit": False,
                          "icp": False, "per_class": "global", "limit": None,
                          "tuning.epochs": 2, "tuning.learning_rate": 1e-4,
                          "again.learning_rate": None}
    args = parser().parse_args(["--data", "d", "--n", "3", "--style", "letter", "--no-wu",
                                "--refit", "--icp", "--selection", "per-class", "--limit", "5",
                                "--epochs", "3", "--lr", "0.5", "--again-lr", "0.25"])
    assert read_arguments(args, Toy) == {
        "data": "d", "n": 3, "style": "letter", "ablate": False, "refit": True, "icp": True,
        "per_class": True, "limit": 5, "tuning": {"epochs": 3.0, "learning_rate": 0.5},
        "again": {"learning_rate": 0.25}}
    for bad in (["--n", "x"], ["--style", "html"], ["--selection", "all"], ["--warmup", "1"],
                ["--hidden", "1"], []):
        with pytest.raises(SystemExit):  # --data is required: the field has no default
            parser().parse_args(bad if bad == [] else ["--data", "d", *bad])


def test_a_field_a_recipe_sets_has_no_default_and_its_help_lists_the_recipes(capsys):
    p = parser(recipes=RECIPES)
    args = p.parse_args(["--data", "d"])
    assert (args.icp, args.per_class, getattr(args, "tuning.epochs")) == (None, None, None)
    assert read_arguments(args, Toy) == {"data": "d", "n": 4, "style": "text", "ablate": True,
                                         "refit": False, "tuning": {"learning_rate": 1e-4}}
    assert p.parse_args(["--data", "d", "--no-icp"]).icp is False  # both ways
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    for said in ("retrieval (from --recipe: fast off, slow on)",
                 "threshold scope (from --recipe: fast per-class, slow global)",
                 "epochs (from --recipe: fast 1, slow 9)", "samples (4)",
                 "ablation: without the warm-up", "the second's learning rate (as --lr)",
                 "first N, 100% of them by default", "--limit N"):
        assert said in text, said


def test_only_and_skip_choose_the_fields():
    p = argparse.ArgumentParser()
    add_arguments(p, Toy, only=("n", "style"))
    assert vars(p.parse_args([])) == {"n": 4, "style": "text"}
    p = argparse.ArgumentParser()
    add_arguments(p, Toy, skip=("data", "tuning", "again"))
    assert "data" not in vars(p.parse_args([])) and "tuning.epochs" not in vars(p.parse_args([]))
