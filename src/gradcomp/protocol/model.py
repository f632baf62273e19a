"""Which tensors of a model travel, and the global model a job starts from.

Only floating-point state-dict entries are federated (integer buffers such as batch-norm
counters stay local), in state-dict order; the coordinator and every client agree on this set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradcomp.compression.payload import numel_of
from gradcomp.tasks import Task

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return numel_of(self.shape)


def model_spec(params: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """What every tensor of a model's update, or of a global model, must look like: same names, shapes, dtypes."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in params.items()}


def model_params(model: nn.Module) -> Params:
    """The federated tensors of `model` (detached copies, state-dict order)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def initial_params(task: Task, seed: int) -> Params:
    """The seeded initial global model of a job (`gradcomp serve` and `gradcomp fedsim` alike)."""
    torch.manual_seed(seed)
    return model_params(task.make_model())
