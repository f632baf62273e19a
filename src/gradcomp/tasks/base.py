"""The Task type every task module returns, its error, and evaluation of a model on a dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class TaskError(ValueError):
    """A task name, argument or entry point that cannot be loaded."""


@dataclass
class Task:
    """What a worker or client needs to train: a fresh model and the data."""

    name: str
    make_model: Callable[[], nn.Module]
    train_set: Dataset
    test_set: Dataset | None = None
    num_classes: int = 10
    info: dict[str, Any] = field(default_factory=dict)
    # the natural client of each training example (a writer, a module): what `partition: natural` splits by
    groups: torch.Tensor | None = None

    def labels(self) -> torch.Tensor:
        """Train labels as one tensor (for partitioners); requires a TensorDataset."""
        if isinstance(self.train_set, TensorDataset):
            return self.train_set.tensors[1]
        return torch.as_tensor([int(self.train_set[i][1]) for i in range(len(self.train_set))])


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of `model` on `dataset`."""
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(dim=1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}
