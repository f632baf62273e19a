"""Local training: from the global parameters and a client's data to its local parameters.

`LocalTrainer.train(params, data, cfg, seed) -> TrainResult` is the seam a vectorised cohort
trainer replaces (`sim/cohort.py` does, for a whole cohort at once): it sees only tensors,
the training config and a seed, and returns new parameters. The reference semantics, which
the cohort path must match, are here: `epochs` passes over the client's shard in batches of
`batch_size`, reshuffled every epoch by `client_batches` (one `torch.randperm` per epoch from a
generator seeded with `seed`) or, in fixed-work mode (`steps` > 0), `steps` batches of
`batch_size` positions drawn uniformly with replacement (`fixed_batches`: the same work for any
shard size); the task's objective (`Objective.mean` of each batch), SGD with heavy-ball momentum
exactly as torch.optim.SGD (dampening 0). `train_loss` is the mean of the batch losses over all
local steps. The step is written out because the first `torch.optim` optimiser in a process
imports torch._dynamo, sympy and torch.distributed (~3 s of CPU per client start).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import ClientData
from gradcomp.strategies import Correction
from gradcomp.tasks import Classification, Objective

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SGDConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    steps: int = 0  # > 0: fixed-work mode (`fixed_batches`); epochs is then unused

    @classmethod
    def of(cls, cfg: LocalTrainingConfig) -> SGDConfig:
        return cls(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.steps)


class RoundTooLong(RuntimeError):
    """Local training ran past the client's own wall-time bound for a round."""


def _orders(num_examples: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield torch.randperm(num_examples, generator=gen)


def epoch_orders(num_examples: int, cfg: SGDConfig, seed: int) -> torch.Tensor:
    """[epochs, num_examples]: the shard's order in each epoch (the client's only randomness)."""
    return torch.stack(list(_orders(num_examples, cfg.epochs, seed)))


def fixed_batches(num_examples: int, cfg: SGDConfig, seed: int) -> Iterator[torch.Tensor]:
    """Fixed-work mode's `steps` batches of `batch_size` positions, drawn uniformly with replacement one
    batch at a time: the number of steps and of examples touched is the same for a shard of any size."""
    if num_examples < 1:
        raise ValueError("fixed-work mode needs at least one example")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.steps):
        yield torch.randint(num_examples, (cfg.batch_size,), generator=gen)


def client_batches(num_examples: int, cfg: SGDConfig, seed: int) -> Iterator[torch.Tensor]:
    """The client's batches (positions in its shard), in the order it trains on them: the orders of
    `epoch_orders`, drawn one epoch at a time (a coordinator's epoch count must not size an allocation),
    or in fixed-work mode (`steps` > 0) `fixed_batches`."""
    if cfg.steps:
        yield from fixed_batches(num_examples, cfg, seed)
        return
    for order in _orders(num_examples, cfg.epochs, seed):
        for start in range(0, num_examples, cfg.batch_size):
            yield order[start : start + cfg.batch_size]


def num_steps(num_examples: int, cfg: SGDConfig) -> int:
    return cfg.steps or cfg.epochs * math.ceil(num_examples / cfg.batch_size)


def train_one(
    model: nn.Module,
    data: ClientData,
    cfg: SGDConfig,
    seed: int,
    objective: Objective,
    correction: Correction | None = None,
    max_seconds: float | None = None,
) -> tuple[dict[str, torch.Tensor], float, int]:
    """Train `model` in place on `data` under `objective` (plus the strategy's `correction`, when
    given); returns (state_dict, mean batch loss of the task's objective, steps). Past `max_seconds`
    it stops with `RoundTooLong`."""
    model.train()
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    weights: list[torch.Tensor] = [p for _, p in named]
    velocity = [torch.zeros_like(w) for w in weights] if cfg.momentum else []
    active = torch.ones(1)
    losses: list[torch.Tensor] = []
    end = None if max_seconds is None else time.monotonic() + max_seconds
    for batch in client_batches(data.num_examples, cfg, seed):
        if end is not None and time.monotonic() > end:
            raise RoundTooLong(f"local training passed {max_seconds:g} s after {len(losses)} steps")
        x, y = data.batch(batch)
        loss = objective.mean(model(x), y)
        total = loss if correction is None else loss + correction(dict(named))
        grads = torch.autograd.grad(total, weights, allow_unused=True)
        with torch.no_grad():
            sgd_update(
                weights,
                velocity,
                [_or_zero(g, w) for g, w in zip(grads, weights, strict=True)],
                active,
                cfg.lr,
                cfg.momentum,
            )
        losses.append(loss.detach())
    mean = float(torch.stack(losses).mean()) if losses else 0.0
    return model.state_dict(), mean, len(losses)


def _or_zero(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A parameter the loss does not reach gets a zero gradient (torch.optim.SGD skips it; with
    momentum 0 and a zero buffer the result is the same)."""
    return torch.zeros_like(like) if grad is None else grad


def sgd_update(
    params: list[torch.Tensor],
    buffers: list[torch.Tensor],
    grads: list[torch.Tensor],
    active: torch.Tensor,
    lr: float,
    momentum: float,
) -> None:
    """The local SGD step, written once: torch.optim.SGD's update (heavy-ball momentum, dampening 0)
    in place, for one client (`active` = [1]) or a whole stacked cohort (`active`: 1 or 0 per client,
    leading dimension of every tensor; sim/cohort_step.py).

    p += -lr * g * active, and with momentum buf = buf * (momentum if active else 1) + g * active
    first: a client that sits a padded step out keeps its parameters and momentum exactly. Buffers
    start at zero, so the first step's buffer is g, as torch's is. In place, because a cohort's
    parameters are many megabytes and fresh tensors per step cost more than the arithmetic.
    """
    if momentum:
        keep = active * momentum + (1 - active)
        for b, g in zip(buffers, grads, strict=True):
            b.mul_(_lead(keep, b)).addcmul_(g, _lead(active, g))
        grads = buffers
    for p, g in zip(params, grads, strict=True):
        p.addcmul_(g, _lead(active, g), value=-lr)


def _lead(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-client vector shaped to broadcast over one (stacked) tensor."""
    return v.view(-1, *([1] * (like.dim() - 1))) if like.dim() else v.view(())


@dataclass(frozen=True)
class TrainResult:
    params: Params  # the local model after training: the same names as the global params given
    train_loss: float  # mean of the batch losses over all local steps
    num_examples: int  # examples in one epoch (the FedAvg weight)


class LocalTrainer(Protocol):
    def train(
        self,
        params: Params,
        data: ClientData,
        cfg: LocalTrainingConfig,
        seed: int,
        correction: Correction | None = None,
    ) -> TrainResult:
        """Train from `params` on `data` for `cfg.epochs`, the strategy's `correction` added to the loss;
        randomness only from `seed`."""
        ...


class SGDTrainer:
    """`train_one` on one model object, reused across rounds and clients."""

    def __init__(self, model: nn.Module, objective: Objective | None = None, max_seconds: float | None = None):
        self.model = model
        self.max_seconds = max_seconds  # the client's wall-time bound on one round's training
        self.objective = objective if objective is not None else Classification()
        # Float entries are federated and must all come from `params`; integer buffers stay local.
        self.federated = {k for k, v in model.state_dict().items() if v.is_floating_point()}

    def train(
        self,
        params: Params,
        data: ClientData,
        cfg: LocalTrainingConfig,
        seed: int,
        correction: Correction | None = None,
    ) -> TrainResult:
        loaded = self.model.load_state_dict(params, strict=False)
        untrained = sorted(self.federated & set(loaded.missing_keys))
        if untrained or loaded.unexpected_keys:
            raise ValueError(f"global params miss {untrained} and name {loaded.unexpected_keys} the model lacks")
        state, loss, _ = train_one(
            self.model, data, SGDConfig.of(cfg), seed, self.objective, correction, self.max_seconds
        )
        return TrainResult({k: state[k].detach().clone() for k in params}, loss, data.num_examples)
