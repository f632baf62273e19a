"""Local gloo ranks: results come back, a rank's exception reaches the caller with its message."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessRaisedException

from gradcomp.worker.local_group import spawn_gloo_ranks


def _sum_ranks(rank: int, out_dir: str) -> None:
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    Path(out_dir, f"rank{rank}").write_text(f"{dist.get_world_size()} {total.item()}")


def _fail_on_one(rank: int) -> None:
    dist.barrier()
    if rank == 1:
        raise ValueError("rank one refuses")


def test_every_rank_joins_one_group_and_returns() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_sum_ranks, (tmp,), world=3)
        assert [Path(tmp, f"rank{r}").read_text() for r in range(3)] == ["3 6.0"] * 3


def test_a_rank_exception_is_raised_in_the_caller() -> None:
    with pytest.raises(ProcessRaisedException, match="rank one refuses"):
        spawn_gloo_ranks(_fail_on_one, (), world=2)
