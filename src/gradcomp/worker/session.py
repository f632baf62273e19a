"""What a training worker is handed by its launcher (`Session`) and the objects of one run (`Run`),
shared by the loop (`worker/loop.py`) and its checkpoints (`worker/checkpoint.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcomp.config.train import TrainJob
from gradcomp.tasks import Task
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.hook import CompressionState
from gradcomp.worker.sampling import PoissonPlan, RandomSource

STATE_FILE = "state.pt"


def rank_file(rank: int) -> str:
    """Name of one rank's own checkpoint file (EF memory, the DP ledgers): EF memory differs per rank."""
    return f"rank-{rank}.pt"


@dataclass
class Session:
    """How the loop talks to whatever launched it.

    `report(metrics, checkpoint_dir)` must be called by every rank the same number of times
    (Ray Train's report is a barrier); `restore` is a directory holding the last checkpoint.
    `before_step(global_step, rank)`, if given, runs before every step: tests inject worker
    faults with it; `gradcomp train` never sets it.
    """

    rank: int
    world: int
    device: torch.device
    report: Callable[[dict[str, Any], Path | None], None]
    restore: Path | None = None
    progress: Callable[[dict[str, Any]], None] | None = None
    before_step: Callable[[int, int], None] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    last_flush: float = field(default=0.0, repr=False)  # time.monotonic() of the last progress hand-off


@dataclass
class Run:
    """The per-run training objects, passed as one: reports, checkpoints and restores need all of them."""

    job: TrainJob
    session: Session
    task: Task
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    hook_state: CompressionState
    dp: ExampleDP | None
    model: nn.Module  # what the step calls: DDP around `module`, or `module` itself under DP
    n_train: int
    steps_per_epoch: int
    poisson: PoissonPlan | None  # DP-SGD's batch sampling (None: shuffled fixed-size batches)
    inclusions: RandomSource | None  # DP-SGD: the rank's secret source of Poisson inclusions
