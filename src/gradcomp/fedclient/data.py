"""A client's examples as tensors (what local training slices batches from)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from gradcomp.partition import partition
from gradcomp.tasks import Task


@dataclass(frozen=True)
class ClientData:
    x: torch.Tensor
    y: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the examples (dtypes, shapes and bytes of x and y, in order): part of each
        local-DP release's noise key, so other data never shares a release's noise. Computed once."""
        h = hashlib.sha256(b"gradcomp-client-data/v1")
        for t in (self.x, self.y):
            h.update(f"\x1f{t.dtype}\x1f{tuple(t.shape)}\x1f".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def subset(self, indices: np.ndarray) -> ClientData:
        """The examples at `indices` (in that order)."""
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return ClientData(self.x[idx], self.y[idx])


def dataset_tensors(dataset: Any) -> ClientData:
    """All examples of a dataset: a TensorDataset's own tensors, or stacked item by item."""
    if hasattr(dataset, "tensors"):
        return ClientData(dataset.tensors[0], dataset.tensors[1])
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return ClientData(torch.stack([torch.as_tensor(v) for v in xs]), torch.as_tensor([int(v) for v in ys]))


def iid_shard(task: Task, index: int, num_shards: int, seed: int) -> ClientData:
    """Shard `index` of `num_shards` of the task's training set: the simulation's `iid` partition,
    so a real client and a simulated one with the same index train on the same examples."""
    parts = partition(task.labels().numpy(), num_shards, "iid", seed=seed)
    return dataset_tensors(task.train_set).subset(parts[index])
