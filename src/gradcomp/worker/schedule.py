"""The learning-rate schedule of a training job: a factor of `optimizer.lr` per optimizer step.

A linear warm-up over `warmup_steps` multiplies every schedule. After it:
- `step`: times `gamma` every `step_epochs` epochs;
- `cosine`: half a cosine from lr down to `min_lr` at the last step;
- `sigmoid`: 1 - sigmoid(steepness * (progress - midpoint)) over the steps after warm-up
  (progress 0..1), divided by its value at progress 0 so the rate starts exactly at lr, and
  decaying towards `min_lr`: the rate stays near lr for a while and then falls off quickly
  around the midpoint, where a cosine starts decaying at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gradcomp.config.train import ScheduleConfig, TrainJob


def lr_schedule(job: TrainJob, steps_per_epoch: int) -> Callable[[int], float]:
    """factor(step) for `torch.optim.lr_scheduler.LambdaLR`: the rate at step 0, 1, ... over lr."""
    return schedule_factor(job.schedule, job.optimizer.lr, job.epochs * steps_per_epoch, steps_per_epoch)


def schedule_factor(s: ScheduleConfig, lr: float, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    """factor(step) for a run of `total` steps of `steps_per_epoch` each epoch at base rate `lr`."""
    floor = s.min_lr / lr
    span = max(1, total - s.warmup_steps)
    start = _sigmoid_decay(0.0, s)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else 1.0
        progress = min(max(0, step - s.warmup_steps), span) / span
        if s.name == "step":
            base = s.gamma ** ((step // steps_per_epoch) // s.step_epochs)
        elif s.name == "cosine":
            base = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif s.name == "sigmoid":
            base = floor + (1 - floor) * _sigmoid_decay(progress, s) / start
        else:
            base = 1.0
        return warm * base

    return factor


def _sigmoid_decay(progress: float, s: ScheduleConfig) -> float:
    """1 - sigmoid(steepness * (progress - midpoint)), computed without overflow."""
    z = s.steepness * (progress - s.midpoint)
    return math.exp(-z) / (1 + math.exp(-z)) if z >= 0 else 1 / (1 + math.exp(z))
