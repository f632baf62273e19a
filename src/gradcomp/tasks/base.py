"""The Task type every task module returns, its error, and evaluation of a model on a dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from gradcomp.errors import GradcompError
from gradcomp.tasks.batches import batch_of, dataset_len, index_batches
from gradcomp.tasks.objective import Classification, Objective


class TaskError(GradcompError, ValueError):
    """A task name, argument or entry point that cannot be loaded."""


@dataclass
class Task:
    """What a worker or client needs to train: a fresh model, the data, and the objective.

    The objective is the loss every training path minimises and the metrics evaluation reports
    (`tasks/objective.py`); classification (cross-entropy, accuracy) unless the task says otherwise.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train_set: Dataset
    test_set: Dataset | None = None
    num_classes: int = 10
    info: dict[str, Any] = field(default_factory=dict)
    # the natural client of each training example (a writer, a module): what `partition: natural` splits by
    groups: torch.Tensor | None = None
    objective: Objective = field(default_factory=Classification)

    def labels(self) -> torch.Tensor:
        """Train labels as one tensor (for partitioners). A task whose targets are not class labels
        (regression, next-token) has one class: every partition by label sees a single label."""
        n = dataset_len(self.train_set)
        if not self.objective.class_labels:
            return torch.zeros(n, dtype=torch.long)
        # a chunk at a time: only the targets are kept, never the whole set's inputs at once
        chunks = [batch_of(self.train_set, idx)[1] for idx in index_batches(n, 4096)]
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset | None = None,
        batch_size: int = 512,
        device: str | torch.device = "cpu",
    ) -> dict[str, float]:
        """The objective's metrics of `model` on `dataset` (default: the test set; {} without one)."""
        dataset = self.test_set if dataset is None else dataset
        if dataset is None:
            return {}
        return self.objective.evaluate(model, dataset, device=device, batch_size=batch_size)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    objective: Objective | None = None,
) -> dict[str, float]:
    """The metrics of `model` on `dataset` under `objective` (default: classification's loss and accuracy)."""
    return (objective or Classification()).evaluate(model, dataset, device=device, batch_size=batch_size)
