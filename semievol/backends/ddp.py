"""Data-parallel ranks for the hf backend: the process group, and a call's work split over
the ranks with the whole, ordered result handed back to every rank.

``torchrun`` and ``accelerate launch`` start one process per device and set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Every rank runs the same
pipeline: fine-tunes are DDP (transformers' Trainer does it once the group exists), and a
generation or embedding call takes this rank's share of the inputs, then
:func:`all_gather` gives every rank every share, so all ranks see the same results and take
the same decisions. With one process (no ``WORLD_SIZE`` above 1) every function here is a
no-op that returns what one process would.
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT = timedelta(hours=2)
"""How long a rank waits for the others at a collective: long, since rank 0 alone writes
files and a slow shard of a big model may lag."""


def setup(device: str) -> None:
    """Join the launcher's process group (gloo on CPU, nccl on GPU) unless there is none to
    join (one process) or this process has joined already; leave it at exit."""
    if _env_world_size() <= 1 or dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    atexit.register(teardown)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait until every rank is here."""
    if world_size() > 1:
        dist.barrier()


def share(items: Sequence[T]) -> list[T]:
    """This rank's share: every ``world_size``-th item from its rank on. Over items sorted by
    cost (prompt length) the shares are about even."""
    return list(items[rank()::world_size()])


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int) -> int:
    """A seed for this rank derived from ``seed``: ``seed`` itself on rank 0 (so one process
    samples as before), distinct well-mixed seeds on the others."""
    if rank() == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1, np.uint64)[0] >> 1)


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
