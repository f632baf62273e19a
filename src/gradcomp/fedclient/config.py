"""The training settings a client receives, and the hook for its own checks on them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradcomp._proto import fed_pb2
from gradcomp.errors import GradcompError
from gradcomp.fedclient.secure import EncodingRefused, encoding_from_pb
from gradcomp.secagg.plan import ClientEncoding
from gradcomp.strategies import ClientHalf, SettingsRefused, client_half


class TaskRefused(GradcompError, ValueError):
    """A client's own check refused the coordinator's task (e.g. a task not on its allowlist)."""


class BadTrainingConfig(GradcompError, ValueError):
    """A `TrainingConfig` no job file could produce (malformed task arguments, a batch size of 0, ...)."""


@dataclass(frozen=True)
class LocalTrainingConfig:
    """Everything a client's round depends on besides its data, its memory and the global model."""

    task: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    spec: str  # the client compression spec (`FedJob.client_spec()`: dp prepended where the job says)
    seed: int  # the job seed: batch order and random selection derive from it (`seeds.round_seed`), not dp noise
    task_args: dict[str, Any] = field(default_factory=dict)
    strategy: str = ""  # the job's strategy: its client half trains (empty: plain local SGD)
    strategy_settings: dict[str, float] = field(default_factory=dict)
    # Fixed-work mode (> 0): exactly this many batches of batch_size, drawn with replacement, whatever the
    # shard's size, so the round's work (and time) does not tell the coordinator how many examples it holds.
    steps: int = 0
    secure: ClientEncoding | None = None  # set under secure aggregation: how the client encodes its input

    def __post_init__(self) -> None:
        """The ranges a job file allows (config.fed.LocalSection): a coordinator may send anything."""
        if self.epochs < 1:
            raise BadTrainingConfig(f"local_epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise BadTrainingConfig(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps < 0:
            raise BadTrainingConfig(f"local_steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BadTrainingConfig(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise BadTrainingConfig(f"momentum must be in [0, 1), got {self.momentum}")
        self.half()  # refuses a strategy or settings this client does not understand

    def half(self) -> ClientHalf:
        """The strategy's client half these settings describe."""
        try:
            return client_half(self.strategy, self.strategy_settings)
        except SettingsRefused as err:
            raise BadTrainingConfig(str(err)) from None

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
            task_args=_task_args(msg.task_args_json),
            strategy=msg.strategy,
            strategy_settings=dict(msg.strategy_settings),
            steps=int(msg.local_steps),
            secure=_secure(msg),
        )


def _secure(msg: fed_pb2.TrainingConfig) -> ClientEncoding | None:
    try:
        return encoding_from_pb(msg)
    except EncodingRefused as err:
        raise BadTrainingConfig(str(err)) from None


def _task_args(text: str) -> dict[str, Any]:
    """The task's keyword arguments: a JSON object (empty text: none)."""
    try:
        args = json.loads(text or "{}")
    except ValueError as err:  # json.JSONDecodeError, and UnicodeDecodeError is one too
        raise BadTrainingConfig(f"task_args_json is not JSON ({err}): {text[:80]!r}") from None
    if not isinstance(args, dict):
        raise BadTrainingConfig(f"task_args_json must be a JSON object of keyword arguments, got {text[:80]!r}")
    return args


# A client-side check: raise TaskRefused to refuse the task before any training happens.
ConfigCheck = Callable[[LocalTrainingConfig], None]


def run_checks(cfg: LocalTrainingConfig, checks: Sequence[ConfigCheck]) -> None:
    for check in checks:
        check(cfg)
