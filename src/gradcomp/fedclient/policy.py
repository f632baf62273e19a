"""A client's own limits on what a coordinator may make it do: run code, or drop its local noise.

The coordinator names the task and the compression spec in every `TrainingConfig`. Trusting
that blindly let a coordinator (or anyone answering on its address without TLS) run any
`module:function` on the client, e.g. `subprocess:getoutput`, and drop the client's local `dp`
stage. A `ClientPolicy` is set on the client only (flags of `gradcomp client`):

- tasks: the built-in names, plus the `module:function` entry points the client allows itself;
  any other task is refused before anything is imported;
- privacy floor: `require_dp`, `min_noise_multiplier`, `max_clip`; a spec whose `dp` stage is
  missing or weaker is refused before training. The floor is about the client's own noise: any
  floor flag requires a `dp` stage that adds noise (sigma > 0), so a client with a floor refuses
  central-DP jobs (their client spec clips but adds no noise) and `dp(clip, sigma=0)`;
- work: epochs, batch size, task arguments, model size, steps and time per round (`limits`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from gradcomp.compression import build
from gradcomp.fedclient.config import ConfigCheck, LocalTrainingConfig, TaskRefused
from gradcomp.fedclient.limits import WorkLimits
from gradcomp.tasks.registry import task_names


@dataclass(frozen=True)
class ClientPolicy:
    allowed_tasks: frozenset[str] = field(default_factory=frozenset)  # entry points beyond the built-ins
    require_dp: bool = False
    min_noise_multiplier: float | None = None
    max_clip: float | None = None
    limits: WorkLimits = field(default_factory=WorkLimits)  # work and memory a round may take

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientPolicy:
        return cls(
            frozenset(getattr(args, "allow_task", None) or ()),
            bool(getattr(args, "require_dp", False)),
            getattr(args, "min_noise_multiplier", None),
            getattr(args, "max_clip", None),
            WorkLimits.from_args(args),
        )

    def checks(self) -> list[ConfigCheck]:
        return [self.check_task, self.limits.check_config, self.check_privacy]

    def check_task(self, cfg: LocalTrainingConfig) -> None:
        if cfg.task in task_names() or cfg.task in self.allowed_tasks:
            return
        raise TaskRefused(
            f"task {cfg.task!r} is neither built in ({', '.join(task_names())}) nor allowed by this client "
            "(gradcomp client --allow-task module:function); nothing was imported"
        )

    def check_privacy(self, cfg: LocalTrainingConfig) -> None:
        wants_dp = self.require_dp or self.min_noise_multiplier is not None or self.max_clip is not None
        if not wants_dp:
            return
        try:
            dp = build(cfg.spec).dp
        except ValueError as err:
            raise TaskRefused(f"compression spec {cfg.spec!r} does not build: {err}") from None
        if dp is None:
            raise TaskRefused(f"this client requires a dp stage; the coordinator's spec {cfg.spec!r} has none")
        if dp.sigma <= 0:
            raise TaskRefused(
                f"this client requires local dp noise; the coordinator's spec {cfg.spec!r} clips but adds none "
                "(sigma=0)"
            )
        if self.min_noise_multiplier is not None and dp.sigma < self.min_noise_multiplier:
            raise TaskRefused(
                f"dp noise multiplier {dp.sigma} is below this client's floor {self.min_noise_multiplier}"
            )
        if self.max_clip is not None and dp.clip > self.max_clip:
            raise TaskRefused(f"dp clip {dp.clip} is above this client's ceiling {self.max_clip}")
        if dp.mechanism != "gaussian" and self.min_noise_multiplier is not None:
            raise TaskRefused(f"dp mechanism {dp.mechanism!r}: this client's floor is for the Gaussian mechanism")
