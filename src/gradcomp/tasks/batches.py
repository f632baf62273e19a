"""Batches from a dataset by index, without copying the dataset.

Training paths slice batches out of the task's own dataset by example index: a
`TensorDataset` is indexed as tensors (one gather per batch), a dataset with a
`gather(indices) -> (inputs, targets)` method builds the batch itself, any other dataset is
read item by item and collated. Clients and ranks hold index tensors into the one dataset, never copies of it,
so a client of a large corpus costs its indices, not its examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import cast

import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate


def dataset_len(dataset: Dataset) -> int:
    """len() of a map-style dataset: every task's has one, though torch's `Dataset` type declares none."""
    return len(cast(Sized, dataset))


def batch_of(
    dataset: Dataset, idx: torch.Tensor, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the examples at positions `idx` of `dataset`, in that order."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    while isinstance(dataset, Subset):  # a view of a view: index the underlying dataset
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)[idx]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0][idx], dataset.tensors[1][idx]
    elif callable(gather := getattr(dataset, "gather", None)):  # a dataset that builds whole batches itself
        x, y = gather(idx)
    else:
        x, y = default_collate([dataset[int(i)] for i in idx])
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def index_batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Positions 0..n-1 in order, `batch_size` at a time (the last batch may be shorter)."""
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(start + batch_size, n))
