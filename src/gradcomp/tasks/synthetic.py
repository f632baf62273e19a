"""Seeded synthetic classification with a model of (about) a chosen parameter count.

Used by benchmarks that need a big gradient (up to ~25M values) without a dataset.
Labels come from a fixed random linear teacher, so the task is learnable.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradcomp.tasks.base import Task, TaskError


def synthetic(
    num_params: int = 100_000,
    num_examples: int = 2048,
    input_dim: int = 256,
    num_classes: int = 10,
    seed: int = 0,
) -> Task:
    """An MLP input_dim -> hidden -> num_classes with hidden chosen to hit `num_params`."""
    per_hidden = input_dim + 1 + num_classes
    hidden = (num_params - num_classes) // per_hidden
    if hidden < 1:
        raise TaskError(f"synthetic: num_params={num_params} too small for input_dim={input_dim}")
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(input_dim, num_classes, generator=gen)
    x = torch.randn(num_examples, input_dim, generator=gen)
    y = (x @ teacher).argmax(dim=1)
    n_test = max(num_examples // 5, 1)

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    return Task(
        "synthetic",
        make_model,
        TensorDataset(x[n_test:], y[n_test:]),
        TensorDataset(x[:n_test], y[:n_test]),
        num_classes=num_classes,
        info={"hidden": hidden, "num_params": hidden * per_hidden + num_classes},
    )
