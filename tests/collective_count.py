"""Counts the bytes each kind of collective is handed, by wrapping torch.distributed itself
(and the all-gather gradcomp's collectives bound at import), so tests can compare a hook's
own accounting with what really went into the collectives; with `keep=True` it also keeps a copy
of every tensor this rank handed over (what an observer of its interconnect messages sees)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

import gradcomp.worker.collectives as collectives


class CollectiveCount:
    """Bytes handed to all-reduce, all-gather (this rank's input) and broadcast (at its source)."""

    def __init__(self, keep: bool = False) -> None:
        self.by_collective: dict[str, int] = {}
        self.keep = keep
        self.sent: list[tuple[str, torch.Tensor]] = []  # (kind, a copy of the tensor handed over), when kept

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        self.by_collective[kind] = self.by_collective.get(kind, 0) + tensor.numel() * tensor.element_size()
        if self.keep:
            self.sent.append((kind, tensor.detach().clone()))

    def take(self) -> dict[str, int]:
        out, self.by_collective = self.by_collective, {}
        return out


@contextlib.contextmanager
def counting(keep: bool = False) -> Iterator[CollectiveCount]:
    count = CollectiveCount(keep)
    all_reduce, broadcast, gather = dist.all_reduce, dist.broadcast, collectives._all_gather_single

    def spy_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        count.add("allreduce", tensor)
        return all_reduce(tensor, *args, **kwargs)

    def spy_broadcast(tensor: torch.Tensor, src: int | None = None, *args: Any, **kwargs: Any) -> Any:
        if src == dist.get_rank():  # only the source sends (src is a global rank)
            count.add("broadcast", tensor)
        return broadcast(tensor, src, *args, **kwargs)

    def spy_gather(output: torch.Tensor, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        count.add("allgather", tensor)
        return gather(output, tensor, *args, **kwargs)

    dist.all_reduce, dist.broadcast, collectives._all_gather_single = spy_all_reduce, spy_broadcast, spy_gather
    try:
        yield count
    finally:
        dist.all_reduce, dist.broadcast, collectives._all_gather_single = all_reduce, broadcast, gather
