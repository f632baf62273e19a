"""A client's examples: positions into the task's training set (a view, never a copy).

Local training slices each batch out of the one dataset by index (`tasks.batch_of`), so a
simulation's thousands of clients, or a real client of a large corpus, hold index tensors only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from gradcomp.partition import partition
from gradcomp.tasks import Task, batch_of, dataset_len


@dataclass(frozen=True)
class ClientData:
    """The examples at `indices` (int64, in that order) of `dataset`."""

    dataset: Dataset
    indices: torch.Tensor

    @classmethod
    def of_tensors(cls, x: torch.Tensor, y: torch.Tensor) -> ClientData:
        """Examples given as tensors (inputs, targets): a view of all of them."""
        return cls(TensorDataset(x, y), torch.arange(int(y.shape[0])))

    @property
    def num_examples(self) -> int:
        return int(self.indices.shape[0])

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the examples (dtypes, shapes and bytes of x and y, in order): part of each
        local-DP release's noise key, so other data never shares a release's noise. Computed once."""
        h = hashlib.sha256(b"gradcomp-client-data/v1")
        for t in self.batch(torch.arange(self.num_examples)):
            h.update(f"\x1f{t.dtype}\x1f{tuple(t.shape)}\x1f".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the client's examples at `positions` (0..num_examples-1)."""
        return batch_of(self.dataset, self.indices[positions])

    def subset(self, indices: np.ndarray | torch.Tensor) -> ClientData:
        """The client's examples at `indices` (positions in this view), in that order: still a view."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ClientData(self.dataset, self.indices[idx])

    @property
    def x(self) -> torch.Tensor:
        """All the client's inputs, gathered (a copy: for tests and small shards)."""
        return self.batch(torch.arange(self.num_examples))[0]

    @property
    def y(self) -> torch.Tensor:
        """All the client's targets, gathered (a copy: for tests and small shards)."""
        return self.batch(torch.arange(self.num_examples))[1]


def dataset_view(dataset: Dataset) -> ClientData:
    """Every example of `dataset`, as a view."""
    return ClientData(dataset, torch.arange(dataset_len(dataset)))


def iid_shard(task: Task, index: int, num_shards: int, seed: int) -> ClientData:
    """Shard `index` of `num_shards` of the task's training set: the simulation's `iid` partition,
    so a real client and a simulated one with the same index train on the same examples."""
    parts = partition(task.labels().numpy(), num_shards, "iid", seed=seed)
    return dataset_view(task.train_set).subset(parts[index])
