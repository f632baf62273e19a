"""The Task type, the registry of built-in tasks and user entry points."""

from __future__ import annotations

import importlib
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

    def labels(self) -> torch.Tensor:
        """Train labels as one tensor (for partitioners); requires a TensorDataset."""
        if isinstance(self.train_set, TensorDataset):
            return self.train_set.tensors[1]
        return torch.as_tensor([int(self.train_set[i][1]) for i in range(len(self.train_set))])


def _builtin() -> dict[str, Callable[..., Task]]:
    from gradcomp.tasks.digits import digits_cnn, digits_mlp
    from gradcomp.tasks.synthetic import synthetic

    return {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn, "synthetic": synthetic}


def task_names() -> list[str]:
    return sorted(_builtin())


def load_task(name: str, **kwargs: Any) -> Task:
    """Load a built-in task by name, or a user's `package.module:function`.

    A user function is called with `**kwargs` and returns a `Task` or a
    `(model_factory, train_set, test_set)` tuple.
    """
    builtin = _builtin()
    if name in builtin:
        try:
            return builtin[name](**kwargs)
        except TypeError as err:
            raise TaskError(f"task {name!r}: bad arguments {kwargs}: {err}") from err
    if ":" not in name:
        raise TaskError(f"unknown task {name!r}: use one of {sorted(builtin)} or a 'module:function' entry point")
    module_name, func_name = name.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise TaskError(f"task entry point {name!r} cannot be loaded: {err}") from err
    out = func(**kwargs)
    if isinstance(out, Task):
        return out
    if isinstance(out, tuple) and len(out) == 3 and callable(out[0]):
        return Task(name=name, make_model=out[0], train_set=out[1], test_set=out[2])
    raise TaskError(
        f"task entry point {name!r} must return a Task or (model_factory, train_set, test_set),"
        f" got {type(out).__name__}"
    )


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
