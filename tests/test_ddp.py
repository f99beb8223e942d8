"""The hf backend's data-parallel helpers over a real two-process gloo group (no model)."""
from __future__ import annotations

import pytest
from conftest import need  # noqa: E402

torch = need("torch")
from semievol.backends import ddp  # noqa: E402


def test_one_process_gets_everything_unchanged():
    assert ddp.world_size() == 1 and ddp.rank() == 0
    assert ddp.share([3, 1, 2]) == [3, 1, 2]
    assert ddp.all_gather({"a": 1}) == [{"a": 1}]
    assert ddp.rank_seed(7) == 7
    ddp.barrier()


def _two_ranks(rank: int, port: int, queue) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    ddp.setup("cpu")
    items = list(range(7))
    mine = ddp.share(items)
    parts = ddp.all_gather({i: i * i for i in mine})
    merged = {k: v for part in parts for k, v in part.items()}
    queue.put((rank, mine, [merged[i] for i in items], ddp.rank_seed(5)))
    ddp.teardown()


@pytest.mark.slow
def test_two_ranks_split_the_work_and_both_get_the_whole_result():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (_, mine0, all0, seed0), (_, mine1, all1, seed1) = got
    assert mine0 == [0, 2, 4, 6] and mine1 == [1, 3, 5]
    assert all0 == all1 == [i * i for i in range(7)]
    assert seed0 == 5 and seed1 != 5


def test_torchrun_passes_samples_through_where_it_refuses_n():
    """torchrun's own parser takes ``--n`` for an abbreviation of its options (--nnodes,
    --nproc-per-node...) and stops; ``--samples``, the same flag, reaches semievol."""
    from torch.distributed.run import get_args_parser

    from semievol.cli import _parser, _run_config

    launch = ["--nproc_per_node", "2", "-m", "semievol", "run", "--data", "d",
              "--backend", "hf"]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(launch + ["--n", "2"])
    passed = get_args_parser().parse_args(launch + ["--samples", "2"]).training_script_args
    assert _run_config(_parser().parse_args(passed)).n == 2
