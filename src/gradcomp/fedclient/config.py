"""The training settings a client receives, and the hook for its own checks on them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradcomp._proto import fed_pb2


class TaskRefused(ValueError):
    """A client's own check refused the coordinator's task (e.g. a task not on its allowlist)."""


@dataclass(frozen=True)
class LocalTrainingConfig:
    """Everything a client's round depends on besides its data, its memory and the global model."""

    task: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    spec: str  # the client compression spec (`FedJob.client_spec()`: dp prepended where the job says)
    seed: int  # the job seed; a client's round randomness is derived from it (`seeds.round_seed`)
    task_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: fed_pb2.TrainingConfig) -> LocalTrainingConfig:
        return cls(
            task=msg.task,
            epochs=int(msg.local_epochs),
            batch_size=int(msg.batch_size),
            lr=float(msg.lr),
            momentum=float(msg.momentum),
            spec=msg.compression,
            seed=int(msg.seed),
            task_args=json.loads(msg.task_args_json or "{}"),
        )


# A client-side check: raise TaskRefused to refuse the task before any training happens.
ConfigCheck = Callable[[LocalTrainingConfig], None]


def run_checks(cfg: LocalTrainingConfig, checks: Sequence[ConfigCheck]) -> None:
    for check in checks:
        check(cfg)
