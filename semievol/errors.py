"""The exceptions semievol raises, in one small tree.

    SemievolError
     ├── DataError            bad input: names the file, line and field
     ├── ConfigError          an invalid option or configuration value
     ├── BackendUnavailable   a backend's optional dependency is not installed
     └── BackendError         a backend failed after its own retries
          ├── FinetuneFailed  a fine-tuning run / job ended in failure
          └── BudgetExceeded  the next step would pass --max-cost-usd

Third-party errors (torch, openai, httpx) are translated into these at the backend edge,
so callers catch one tree.
"""
from __future__ import annotations


class SemievolError(Exception):
    """Base of every error semievol raises on purpose."""


class DataError(SemievolError, ValueError):
    """Bad input data. The message reads ``file:line: field: what is wrong``."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field = file, line, field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        parts = [p for p in (where, f"field '{field}'" if field else None, message) if p]
        super().__init__(": ".join(parts))


class ConfigError(SemievolError, ValueError):
    """An invalid configuration value."""


class BackendUnavailable(SemievolError, ImportError):
    """A backend's optional dependencies are missing (the message says what to install)."""


class BackendError(SemievolError, RuntimeError):
    """A backend call failed for good (after retries)."""


class FinetuneFailed(BackendError):
    """A fine-tuning run or job failed; the message carries the backend's own reason."""


class BudgetExceeded(BackendError):
    """Spending the next step would pass the run's cost limit."""
