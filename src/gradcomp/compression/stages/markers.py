"""Stages that mark a pipeline rather than transform a tensor: none, ef, powersgd."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from gradcomp.compression.spec import SpecError
from gradcomp.compression.stages.base import Stage, StepContext, Work, register


@register
@dataclass
class NoneStage(Stage):
    name: ClassVar[str] = "none"
    role: ClassVar[str] = "identity"


@register
@dataclass
class PowerSGD(Stage):
    """Marker for torch's PowerSGD DDP hook (rank-r factors P and Q, each all-reduced).

    Not a per-tensor stage: the worker hands whole DDP buckets to torch's own
    `powerSGD_hook` and `PowerSGDState`, which keep their error feedback, warm start and
    dense first `start_iter` steps. Arguments map one to one onto `PowerSGDState`:
    rank -> matrix_approximation_rank, start_iter -> start_powerSGD_iter,
    min_rate -> min_compression_rate, error_feedback -> use_error_feedback,
    warm_start -> warm_start, seed -> random_seed.
    """

    rank: int = 1
    start_iter: int = 2
    min_rate: float = 2.0
    error_feedback: bool = True
    warm_start: bool = True
    seed: int = 0
    name: ClassVar[str] = "powersgd"
    role: ClassVar[str] = "lowrank"

    def check(self) -> None:
        if self.rank < 1:
            self._fail("rank", f"must be >= 1, got {self.rank}")
        if self.min_rate <= 0 or not math.isfinite(self.min_rate):
            self._fail("min_rate", f"must be a positive number, got {self.min_rate}")
        if self.start_iter < 0:
            self._fail("start_iter", f"must be >= 0, got {self.start_iter}")
        if (self.error_feedback or self.warm_start) and self.start_iter < 2:
            self._fail(
                "start_iter",
                f"must be >= 2 with error_feedback or warm_start (torch's PowerSGD runs them only after "
                f"DDP's first two iterations), got {self.start_iter}",
            )

    def apply(self, work: Work, ctx: StepContext) -> Work:
        raise SpecError("'powersgd' compresses whole DDP buckets through torch's hook; it has no per-tensor form")


@register
@dataclass
class ErrorFeedback(Stage):
    """Marker: the pipeline keeps the residual per key and adds it to the next input."""

    name: ClassVar[str] = "ef"
    role: ClassVar[str] = "feedback"
