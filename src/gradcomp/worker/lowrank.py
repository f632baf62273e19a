"""torch's PowerSGD as a gradcomp compressor: `powersgd(rank=2)` in a spec runs torch's own
`powerSGD_hook` with its own `PowerSGDState` (error feedback, warm start, dense first
`start_powerSGD_iter` iterations), and counts exactly what its all-reduces are handed.

Per bucket, torch's hook all-reduces either the whole bucket (before `start_powerSGD_iter`),
or three tensors: the uncompressed ones (1-D tensors and matrices not worth compressing),
then P (n x r per matrix) and Q (m x r per matrix). The state's
`total_numel_after_compression` grows by exactly the sum of those three sizes, which is
what `run_bucket` reports, times the bucket's element size.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from gradcomp.compression.stages import PowerSGD

PowerSGDState = torch_powersgd.PowerSGDState
_NEVER_LOG = 2**62  # torch logs compression stats every N iterations; gradcomp reports bytes itself


def make_state(stage: PowerSGD, group: dist.ProcessGroup | None = None) -> PowerSGDState:
    """torch's PowerSGD state for a `powersgd(...)` stage (arguments map one to one)."""
    # gradcomp's argument name -> PowerSGDState's
    names = {
        "rank": "matrix_approximation_rank",
        "start_iter": "start_powerSGD_iter",
        "min_rate": "min_compression_rate",
        "error_feedback": "use_error_feedback",
        "warm_start": "warm_start",
        "seed": "random_seed",
    }
    settings = {theirs: getattr(stage, ours) for ours, theirs in names.items()}
    return PowerSGDState(process_group=group, compression_stats_logging_frequency=_NEVER_LOG, **settings)


def run_bucket(state: PowerSGDState, bucket: dist.GradBucket) -> tuple[torch.futures.Future[torch.Tensor], int]:
    """Run torch's hook on one bucket; also return the bytes its all-reduces were handed."""
    buffer = bucket.buffer()
    if state.iter < state.start_powerSGD_iter:  # torch's dense warm-up: the whole bucket
        return torch_powersgd.powerSGD_hook(state, bucket), buffer.numel() * buffer.element_size()
    before = state.total_numel_after_compression
    fut = torch_powersgd.powerSGD_hook(state, bucket)
    return fut, (state.total_numel_after_compression - before) * buffer.element_size()


def state_dict(state: PowerSGDState) -> dict[str, Any]:
    """Everything but the process group (torch's own pickling state)."""
    return state.__getstate__()


def load_state_dict(state: PowerSGDState, saved: dict[str, Any]) -> None:
    """Restore `state_dict`'s output (copied: torch's hook replaces entries of its dicts)."""
    group = state.process_group
    state.__setstate__(copy.deepcopy(saved))
    state.process_group = group


def forget_bucket(state: PowerSGDState, index: int) -> None:
    """Drop one bucket's residual and warm-start factors (torch starts it afresh)."""
    for memory in (state.error_dict, state.p_memory_dict, state.q_memory_dict):
        memory.pop(index, None)
