"""Command-line flags read from a config's fields, as TRL's ``HfArgumentParser`` reads
them: a field's metadata holds its help, its type gives the flag's type (and a ``Literal``
its choices), and its default is the flag's. So a default, a choice or a help is written
once, beside the field (``semievol.config.arg``), and ``semievol run`` follows the config.

A field has a flag when its metadata has ``help`` (a string, or a callable read when the
parser is built), named ``--field-name`` unless ``flag`` names it otherwise. Other keys:
``metavar``; ``choices`` (a callable, for values not fixed by a Literal); ``words`` (the
words the flag takes for each value: ``--selection global|per-class`` sets ``per_class``).
A nested config's field gives flags to the ``fields`` it names, after a ``prefix``, their
help after a ``lead``; when the nested config is optional (None: as another), its flags
default to that other's.

A bool field is switched on by ``--name`` (default False) or off by ``--no-name`` (default
True: an ablation). A field a recipe sets (a key of one of ``recipes``' settings) has no
default: a flag not given leaves the recipe's value, which its help lists, and a bool of
a recipe is switched both ways (``--icp`` / ``--no-icp``).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import NoneType


@dataclass(frozen=True)
class Flag:
    """One field's flag."""

    dest: str
    """Where the value goes: the field's name, ``finetune.epochs`` for a nested one's."""
    key: str
    """Its name in a recipe's settings (``epochs``, ``evolve_epochs``)."""
    name: str
    field: dataclasses.Field
    kind: type
    """Its type: int, float, str or bool (None and Literal taken off)."""
    choices: tuple | None
    same_as: str | None = None
    """The flag whose value it takes when not given (``--lr`` for ``--evolve-lr``)."""
    lead: str = ""
    """Before its help: whose it is (``the evolve step's``), for a nested config's."""


def flags(cls, only=None, skip=(), *, prefix: str = "", within: str = "",
          same_as: bool = False, lead: str = "") -> list[Flag]:
    """The flags of ``cls``'s fields (of those in ``only``, none in ``skip``), in field
    order, a nested config's in its place."""
    hints, found = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip or (only is not None and f.name not in only):
            continue
        kind = _plain(hints[f.name])
        if dataclasses.is_dataclass(kind):
            found += flags(kind, meta["fields"], prefix=meta.get("prefix", ""),
                           within=f"{within}{f.name}.", same_as=f.default is None,
                           lead=meta.get("lead", ""))
            continue
        name = meta.get("flag", f.name).replace("_", "-")
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal \
            else tuple(meta.get("words") or _text(meta.get("choices")) or ()) or None
        found.append(Flag(within + f.name, (prefix + f.name).replace("-", "_"),
                          f"--{prefix}{name}", f, str if choices else kind, choices,
                          f"--{name}" if same_as else None, lead))
    return found


def add_arguments(parser: argparse.ArgumentParser, cls, only=None, skip=(), *,
                  recipes: Mapping[str, Mapping] | None = None) -> None:
    """A flag on ``parser`` for each of ``cls``'s fields that has one (see the module)."""
    for flag in flags(cls, only, skip):
        f, name = flag.field, flag.name
        set_by = {r: s[flag.key] for r, s in (recipes or {}).items() if flag.key in s}
        unset = bool(set_by) or flag.same_as is not None  # a value not given is another's
        options = {"dest": flag.dest, "help": _help(flag, set_by).replace("%", "%%")}
        if flag.kind is bool and unset:
            options.update(action=argparse.BooleanOptionalAction, default=None)
        elif flag.kind is bool and f.default:
            name, options["action"] = name.replace("--", "--no-"), "store_false"
        elif flag.kind is bool:
            options["action"] = "store_true"
        else:
            words = f.metadata.get("words", {})
            default = next((w for w, v in words.items() if v == f.default), f.default)
            required = default is dataclasses.MISSING
            options.update(type=flag.kind, choices=flag.choices, required=required,
                           default=None if unset or required else default,
                           metavar=f.metadata.get("metavar", None if flag.choices else
                                                  name[2:].replace("-", "_").upper()))
        parser.add_argument(name, *f.metadata.get("aliases", ()), **options)


def read_arguments(args: argparse.Namespace, cls, only=None, skip=()) -> dict:
    """The fields the parsed flags set, for ``cls(**...)`` or a recipe: a nested config's
    as a dict of its own (``{"finetune": {"epochs": 3.0}}``); a flag not given (None) is
    left out, so the field keeps its recipe's value or its default."""
    fields: dict = {}
    for flag in flags(cls, only, skip):
        value = getattr(args, flag.dest)
        if value is not None:
            within, _, name = flag.dest.rpartition(".")
            words = flag.field.metadata.get("words")
            (fields.setdefault(within, {}) if within else fields)[name] = \
                words[value] if words else value
    return fields


def _help(flag: Flag, set_by: Mapping) -> str:
    """The field's help, and the flag's default: its value (a number's), another flag's,
    or each recipe's."""
    f, text = flag.field, flag.lead + _text(flag.field.metadata["help"])
    if flag.kind is bool and not set_by and f.default:
        text = f"ablation: without {text}"
    said = [f"as {flag.same_as}"] if flag.same_as else []
    if set_by:
        said.append("from --recipe: " + ", ".join(f"{r} {_word(flag, v)}"
                                                  for r, v in set_by.items()))
    elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool) and not said:
        said.append(str(f.default))
    return f"{text} ({'; '.join(said)})" if said else text


def _word(flag: Flag, value) -> str:
    """How a recipe's value reads on the command line."""
    words = {v: w for w, v in flag.field.metadata.get("words", {}).items()}
    if value in words:
        return words[value]
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _plain(hint):
    """``int | None`` → int; a Literal stays itself."""
    if typing.get_origin(hint) is typing.Literal:
        return hint
    args = [a for a in typing.get_args(hint) if a is not NoneType]
    return args[0] if args else hint


def _text(value):
    return value() if callable(value) else value
