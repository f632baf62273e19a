"""Run the ranks of a gloo group as local processes, and end each rank's process safely.

Why the ending needs care: a DDP model keeps its process group alive after
`destroy_process_group()` (the reducer holds it), so gloo's run-loop threads outlive it. Such a
thread drops the last reference to a finished collective's tensors a moment after the caller's
`wait()` returned, and that decref needs the GIL. If the interpreter is finalizing by then, the
thread is made to exit inside C++ code and the process aborts ("terminate called without an active
exception", SIGABRT), after all its work was done. Seen in CI on `tests/test_hook.py`, about one
run in ten; a gdb backtrace showed the run-loop thread in `~AsyncAllgatherWork`. A rank therefore
leaves with `os._exit` once its results are written and its group is destroyed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def end_rank() -> None:
    """Destroy the default group and leave the process without interpreter finalization.

    Call it last, after the rank has written everything it produces: nothing after it runs, no
    `atexit` hook, no `finally` block."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo_ranks(fn: Callable[..., None], args: tuple[Any, ...] = (), world: int = 2) -> None:
    """Run `fn(rank, *args)` in `world` spawned processes joined in one gloo group.

    Each rank uses one intra-op thread (ranks share the machine's cores). `fn` must be picklable
    (a module-level function) and write its results somewhere the caller reads them (a file); an
    exception in any rank is raised here as torch's `ProcessRaisedException`."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(_rank_main, args=(fn, init, world, args), nprocs=world, join=True)


def _rank_main(rank: int, fn: Callable[..., None], init: str, world: int, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    fn(rank, *args)
    end_rank()
