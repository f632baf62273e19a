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
    # The settings each spec is attacked in (audit/settings.py); the verdict takes the worst.
    settings: tuple[str, ...] = ("init", "trained", "federated")
    trained_epochs: int = 3  # `trained`: epochs of training on the task's training set (digits MLP: ~95% test accuracy)
    local_epochs: int = 5  # `federated`: the client's local epochs on its victim batch
    local_batch_size: int = 1  # `federated`: local batch size (a batch of 4 victims: 20 local steps)
    local_lr: float = 0.1  # `federated`: local SGD learning rate

    def __post_init__(self) -> None:
        if self.victims < 1 or self.iterations < 1:
            raise UserError(f"victims and iterations must be >= 1, got {self.victims} and {self.iterations}")
        if not self.settings or len(set(self.settings)) != len(self.settings):
            raise UserError(f"settings must name at least one setting, each once, got {self.settings}")
        if self.trained_epochs < 1 or self.local_epochs < 1 or self.local_batch_size < 1 or not self.local_lr > 0:
            raise UserError("trained_epochs, local_epochs and local_batch_size must be >= 1 and local_lr > 0")
        for batch in self.batch_sizes:
            if not 1 <= batch <= self.victims:
                raise UserError(f"batch size {batch} must be between 1 and the number of victims ({self.victims})")


@dataclass
class SpecAudit:
    """One spec's JSON entry and its matched reconstructions per (attack, batch size) for the grid."""

    entry: dict[str, Any]
    victims: torch.Tensor  # [victims, *input_shape]
    images: dict[tuple[str, int], torch.Tensor]  # (attack, batch size) -> reconstructions in victim order
