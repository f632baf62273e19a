"""The audit's settings and its per-spec result (shared by the runner, the report and the sweep)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gradcomp.errors import UserError


@dataclass(frozen=True)
class AuditConfig:
    """The audit's setting; the defaults are the documented audit."""

    task: str = "digits-mlp"
    task_args: dict[str, Any] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1, 4)
    victims: int = 8
    iterations: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.victims < 1 or self.iterations < 1:
            raise UserError(f"victims and iterations must be >= 1, got {self.victims} and {self.iterations}")
        for batch in self.batch_sizes:
            if not 1 <= batch <= self.victims:
                raise UserError(f"batch size {batch} must be between 1 and the number of victims ({self.victims})")


@dataclass
class SpecAudit:
    """One spec's JSON entry and its matched reconstructions per (attack, batch size) for the grid."""

    entry: dict[str, Any]
    victims: torch.Tensor  # [victims, *input_shape]
    images: dict[tuple[str, int], torch.Tensor]  # (attack, batch size) -> reconstructions in victim order
