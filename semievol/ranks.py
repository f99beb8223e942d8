"""Which process this is under a data-parallel launcher, and the run directory it works in.

``torchrun`` and ``accelerate launch`` start one process (rank) per device and tell each its
``RANK`` and the ``WORLD_SIZE`` in the environment. Every rank runs the same pipeline, so
every rank takes the same decisions (what to skip on resume, which pseudo-labels to keep);
the backend splits each generation call over the ranks and gives all of them the whole
result. Only rank 0 writes the run directory: every other rank works in a private copy of
it, taken before anyone writes (so resume decisions match rank 0's), and deleted at exit.
No torch here: the hf backend owns the process group.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def run_dir(out: Path) -> Iterator[Path]:
    """``out`` on rank 0; on any other rank a fresh private directory, removed at exit.
    Fill it with :func:`mirror` once every rank has started (before rank 0 writes)."""
    if rank() == 0:
        yield out
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"semievol-rank{rank()}-"))
    try:
        yield scratch / out.name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def mirror(out: Path, private: Path) -> None:
    """Copy rank 0's run directory ``out`` (if any: a resumed run) into ``private``."""
    if private != out and out.is_dir():
        shutil.copytree(out, private, dirs_exist_ok=True)
