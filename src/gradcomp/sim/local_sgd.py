"""One client's local training, the reference semantics the vectorised cohort path must match.

Plain SGD (optional momentum) on cross-entropy, `epochs` passes over the client's shard in
batches of `batch_size`, reshuffled every epoch by `client_batches`, the one shuffling rule
both paths use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SGDConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0


def epoch_orders(num_examples: int, cfg: SGDConfig, seed: int) -> torch.Tensor:
    """[epochs, num_examples]: the shard's order in each epoch (the client's only randomness)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_examples, generator=gen) for _ in range(cfg.epochs)])


def client_batches(num_examples: int, cfg: SGDConfig, seed: int) -> list[torch.Tensor]:
    """The client's batches (positions in its shard), in the order it trains on them."""
    return [
        order[start : start + cfg.batch_size]
        for order in epoch_orders(num_examples, cfg, seed)
        for start in range(0, num_examples, cfg.batch_size)
    ]


def num_steps(num_examples: int, cfg: SGDConfig) -> int:
    return cfg.epochs * math.ceil(num_examples / cfg.batch_size)


def train_one(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SGDConfig, seed: int
) -> tuple[dict[str, torch.Tensor], float, int]:
    """Train `model` in place on (x, y); returns (state_dict, mean batch loss, steps)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    losses = []
    for batch in client_batches(y.numel(), cfg, seed):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    mean = float(torch.stack(losses).mean()) if losses else 0.0
    return model.state_dict(), mean, len(losses)
