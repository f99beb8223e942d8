"""The backends semievol knows, in one table: each one's name, loader, command-line options,
price list and default recipe. The command line (choices, help, ``make_backend``), the run
configuration's check, the dry run's estimate and ``semievol serve`` all read it, so a
backend is added here once::

    register(hosted("acme", "my_package.acme", "Acme", help="the Acme API"))

A hosted backend is :class:`~.hosted.HostedBackend` built with its provider's adapter (which
carries its dated price list), imported only when it is needed (a missing SDK gives the
install hint then).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from .. import cost, track
from ..errors import BackendUnavailable, ConfigError


@dataclass(frozen=True)
class Entry:
    """One backend."""

    name: str
    help: str
    """One line for ``--backend``'s help."""
    load: Callable
    """Builds the backend from its options (``workdir`` for all); imports its module only
    then."""
    options: Callable = field(default=lambda args: {})
    """The loader's options from ``semievol run`` / ``eval``'s parsed arguments."""
    recipe: str = "paper"
    """The recipe (:data:`semievol.config.RECIPES`) ``semievol run`` takes by default."""
    provider: Callable | None = None
    """A hosted backend's adapter (:class:`~.provider.Provider`), made anew by each call.
    None for a backend that computes here, which ``semievol serve`` can serve."""

    @property
    def hosted(self) -> bool:
        return self.provider is not None

    def check(self, config) -> None:
        """Refuse, before anything runs or is spent, a run configuration (RunConfig) the
        backend cannot do (the adapter's ``check``, where it has one: Tinker refuses
        ``--icp``, having no embeddings)."""
        if self.hosted and hasattr(api := self.provider(), "check"):
            api.check(config)

    @property
    def prices(self) -> cost.PriceList | None:
        """Its dated price list (the adapter's): hosted backends only."""
        return self.provider().prices if self.hosted else None


BACKENDS: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add (or replace) a backend."""
    BACKENDS[entry.name] = entry
    return entry


def entry(name: str) -> Entry:
    """The backend called ``name``, or ConfigError naming those there are."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: choose {', '.join(BACKENDS)}")
    return BACKENDS[name]


def names(*, hosted: bool | None = None) -> list[str]:
    """The backends' names (only the hosted, or only the local, ones if asked)."""
    return [e.name for e in BACKENDS.values() if hosted is None or e.hosted == hosted]


def hosted(name: str, module: str, adapter: str, *, help: str, extra: str | None = None,
           recipe: str = "paper", settings: Callable = lambda args: {}) -> Entry:
    """The entry of a hosted backend whose adapter is class ``adapter`` of ``module``;
    ``extra``: the pip extra with its SDK, for the hint when it is missing; ``settings``:
    the adapter's own arguments from the parsed command line."""
    provider = partial(_adapter, module, adapter, extra)
    options = lambda args: {**_hosted_options(args), "settings": settings(args)}  # noqa: E731
    return Entry(name, help, partial(_load_hosted, provider), options, recipe=recipe,
                 provider=provider)


def _adapter(module: str, adapter: str, extra: str | None, **settings):
    try:
        return getattr(importlib.import_module(module), adapter)(**settings)
    except ImportError as e:
        if extra is None:
            raise
        raise BackendUnavailable(f"the {extra} backend needs its SDK ({e.name} is missing): "
                                 f'pip install "semievol[{extra}]"') from e


def _load_hosted(provider: Callable, model: str | None = None, *, settings: dict | None = None,
                 **options):
    """The adapter's lifecycle (its ``backend``: a class taking the adapter, the model and
    the options) drives it; by default the job lifecycle, :class:`~.hosted.HostedBackend`."""
    from .hosted import HostedBackend

    api = provider(**(settings or {}))
    return getattr(api, "backend", HostedBackend)(api, model, **options)


def _hosted_options(args) -> dict:
    return {"model": args.model, "base_url": args.base_url, "api_key": args.api_key,
            "timeout": args.timeout, "batch_mode": args.openai_batch,
            "prices": prices(args.price or []),
            "report_to": track.parse(getattr(args, "report_to", None)),
            "quiet": getattr(args, "quiet", False)}


def prices(given: list[str]) -> dict[str, cost.Price]:
    """``--price MODEL=INPUT,OUTPUT[,TRAINING]`` (USD per 1M tokens), each as a Price."""
    table = {}
    for text in given:
        model, _, numbers = text.rpartition("=")
        try:
            values = [float(v) for v in numbers.split(",")]
        except ValueError:
            values = []
        if not model or not 1 <= len(values) <= 3 or \
                not all(math.isfinite(v) and v >= 0 for v in values):
            raise ConfigError(f"--price {text!r}: expected MODEL=INPUT,OUTPUT,TRAINING, "
                              "in USD per 1M tokens (OUTPUT and TRAINING may be left out)")
        table[model] = cost.Price(**dict(zip(("input", "output", "training"), values)))
    return table


def _load_hf(**options):
    try:
        from .hf import HFBackend
    except ImportError as e:
        raise BackendUnavailable(
            f"the hf backend needs torch, transformers and peft ({e.name} is missing): "
            'pip install "semievol[hf]"') from e
    return HFBackend(**options)


def _hf_options(args) -> dict:
    return {"model": args.model, "vllm_url": args.vllm_url,
            "dtype": None if args.dtype == "auto" else args.dtype}


def _load_fake(**options):
    from .fake import FakeBackend

    return FakeBackend(**options)


register(Entry("hf", "local LoRA (default)", _load_hf, _hf_options, recipe="small"))
register(hosted("openai", "semievol.backends.openai", "OpenAI", help="the OpenAI API"))
register(hosted("together", "semievol.backends.together", "Together",
                help="hosted open models on the Together API", extra="together",
                settings=lambda args: {"endpoint": args.together_endpoint}))
register(hosted("tinker", "semievol.backends.tinker", "Tinker",
                help="LoRA by primitives on the Tinker API (or any Tinker-compatible server)",
                extra="tinker", recipe="small"))  # LoRA on open models, as hf: no embeddings
register(Entry("fake", "tests only", _load_fake, recipe="small"))
