"""A client's bounds on the work and memory a coordinator can ask of it in one round.

The coordinator sets local epochs, batch size, the task and its arguments; taken as given,
`local_epochs=10_000_000, batch_size=1` made a client build every epoch's batch order up front
(4 GiB in 13.5 s) and `synthetic(num_examples=10**6, ...)` sized the client's data. `WorkLimits`
(flags of `gradcomp client`) refuses, before anything is loaded or allocated:

- epochs, batch size, and the task arguments (a small JSON object of scalars, every number
  within `max_task_arg`);
- the task's model, counted on the meta device (no memory) against `max_model_params`;
- the local steps of a round (epochs x batches of the client's shard) against `max_steps`;

and while training, a round that runs past `max_round_seconds` (`fedclient.train.RoundTooLong`).
`memory_ceiling` caps the process's address space as the last bound, for whatever a task
allocates that the checks above cannot see (a custom task, a product of two allowed arguments).
The defaults fit the built-in tasks at the sizes the examples and benchmarks use.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, fields

import torch

from gradcomp.errors import UserError
from gradcomp.fedclient.config import LocalTrainingConfig, TaskRefused
from gradcomp.tasks import Task

MAX_TASK_ARGS_BYTES = 4096  # the JSON of the task's arguments
MAX_TASK_ARG_TEXT = 256  # characters of one string argument


@dataclass(frozen=True)
class WorkLimits:
    max_epochs: int = 20
    max_batch_size: int = 4096
    max_steps: int = 20_000
    max_task_arg: int = 100_000
    max_model_params: int = 30_000_000
    max_round_seconds: float = 900.0
    max_memory_mib: int = 8192

    def __post_init__(self) -> None:
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name == "max_memory_mib" else 1e-9  # 0 MiB: no ceiling
            if not value >= least:
                raise UserError(f"--{f.name.replace('_', '-')} must be {'>= 0' if least == 0 else '> 0'}, got {value}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkLimits:
        given = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})

    def check_config(self, cfg: LocalTrainingConfig) -> None:
        """Epochs, batch size and task arguments (a `ConfigCheck`: runs before the task is loaded)."""
        if cfg.epochs > self.max_epochs:
            raise TaskRefused(f"local_epochs {cfg.epochs} is over this client's --max-epochs {self.max_epochs}")
        if cfg.batch_size > self.max_batch_size:
            raise TaskRefused(f"batch_size {cfg.batch_size} is over this client's --max-batch-size "
                              f"{self.max_batch_size}")  # fmt: skip
        size = len(json.dumps(cfg.task_args))
        if size > MAX_TASK_ARGS_BYTES:
            raise TaskRefused(f"task arguments take {size} bytes of JSON; a client takes at most {MAX_TASK_ARGS_BYTES}")
        for name, value in cfg.task_args.items():
            self._check_arg(name, value)

    def _check_arg(self, name: str, value: object) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, str):
            if len(value) > MAX_TASK_ARG_TEXT:
                raise TaskRefused(f"task argument {name!r} is {len(value)} characters long "
                                  f"(at most {MAX_TASK_ARG_TEXT})")  # fmt: skip
            return
        if isinstance(value, (int, float)):
            if not (math.isfinite(value) and abs(value) <= self.max_task_arg):
                raise TaskRefused(f"task argument {name}={value} is over this client's --max-task-arg "
                                  f"{self.max_task_arg}")  # fmt: skip
            return
        kind = type(value).__name__
        raise TaskRefused(f"task argument {name!r} is a {kind}; a client takes numbers, text or booleans")

    def check_model(self, task: Task) -> None:
        """The task's model size, built on the meta device (no storage) before the real one is."""
        with torch.device("meta"):
            probe = task.make_model()
        count = sum(p.numel() for p in probe.parameters())
        if count > self.max_model_params:
            raise TaskRefused(f"the task's model has {count:,} parameters; this client's --max-model-params is "
                              f"{self.max_model_params:,}")  # fmt: skip

    def check_steps(self, num_examples: int, cfg: LocalTrainingConfig) -> None:
        """Local steps of one round on `num_examples` examples."""
        if cfg.steps:  # fixed-work mode: that many batches, whatever the shard's size
            if cfg.steps > self.max_steps:
                raise TaskRefused(f"{cfg.steps:,} local steps a round (fixed-work mode); this client's --max-steps "
                                  f"is {self.max_steps:,}")  # fmt: skip
            return
        steps = cfg.epochs * math.ceil(num_examples / cfg.batch_size)
        if steps > self.max_steps:
            raise TaskRefused(f"{cfg.epochs} epochs of {num_examples} examples in batches of {cfg.batch_size} "
                              f"are {steps:,} local steps a round; this client's --max-steps is "
                              f"{self.max_steps:,}")  # fmt: skip


def memory_ceiling(extra_mib: int) -> int | None:
    """Cap this process's address space at its current size plus `extra_mib` (RLIMIT_AS, where the
    platform has it); the limit set, or None. An allocation past it fails with MemoryError instead of
    the machine swapping. For a whole `gradcomp client` process only: it applies to every thread.
    0 sets none (address space is not memory: a GPU runtime reserves far more than it uses)."""
    if extra_mib <= 0:
        return None
    try:
        import resource
    except ImportError:
        return None
    try:
        with open("/proc/self/statm") as f:  # pages of virtual memory in use now
            used = int(f.read().split()[0]) * resource.getpagesize()
    except OSError:  # no /proc: leave the address space alone
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = used + extra_mib * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft <= want:
        return soft
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    return want
