"""The three collectives a compressed gradient needs, each asynchronous and averaging over ranks.

- dense all-reduce: every rank sends all values (`Dense` payloads, warm-up, no compression);
- sparse all-gather: ranks pick different positions (topk, rtopk), so each rank gathers
  every rank's fixed-size (indices, values) and scatter-adds them;
- shared-index all-reduce: every rank picks the same positions (seeded randomk), so only
  the k values are all-reduced.

Each function starts the collective and returns a `torch.futures.Future` resolving to the
dense *average*, written into a flat tensor the caller passes (DDP's own bucket buffer, so
no full-size temporary is made), and lets the communication overlap with the rest of the
backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from gradcomp.compression import Dense, Payload, Sparse

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in `group` (the default group when None): what every mean divides by."""
    return dist.get_world_size(group)


def _then(work: dist.Work, fn: Callable[[], torch.Tensor]) -> torch.futures.Future[torch.Tensor]:
    """A future resolving to `fn()` once `work` is done (re-raising the collective's error)."""

    def done(fut: torch.futures.Future[object]) -> torch.Tensor:
        fut.value()  # raises if the collective failed
        return fn()

    return work.get_future().then(done)


def allreduce_mean(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.futures.Future[torch.Tensor]:
    """Average `values` (flat) across ranks. Divides before summing so fp16 does not overflow.

    `values` is reduced in place; the future resolves to it, holding the mean.
    """
    values.div_(world_size(group))
    work = dist.all_reduce(values, group=group, async_op=True)
    return _then(work, lambda: values)


def _pack(payload: Sparse) -> torch.Tensor:
    """Indices then values of one payload as one flat byte tensor (one collective, not two)."""
    idx = payload.indices.contiguous().view(torch.uint8)
    val = payload.values.contiguous().view(torch.uint8)
    return torch.cat([idx, val])


def allgather_sparse_mean(
    payload: Sparse, out: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.futures.Future[torch.Tensor]:
    """Gather every rank's (indices, values); the future resolves to `out` holding their mean.

    All ranks must send the same number of values with the same index/value dtypes (true
    for a pipeline's payloads of equally sized tensors: `pipe.kept(n)` is fixed). The k
    values are scaled before they are scattered, so the dense result takes one zero-fill
    and no pass of its own.
    """
    world = world_size(group)
    packed = _pack(payload)
    gathered = torch.empty(world * packed.numel(), dtype=torch.uint8, device=packed.device)
    work = _all_gather_single(gathered, packed, group=group, async_op=True)
    idx_bytes = payload.values.numel() * payload.indices.element_size()

    def decode() -> torch.Tensor:
        rows = gathered.view(world, -1)
        idx = rows[:, :idx_bytes].contiguous().view(payload.indices.dtype).reshape(-1)
        val = rows[:, idx_bytes:].contiguous().view(payload.values.dtype).reshape(-1)
        out.zero_()
        return out.index_add_(0, idx.long(), torch.div(val.to(out.dtype), world))

    return _then(work, decode)


def allreduce_shared_mean(
    payload: Sparse, out: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce only the k values of a payload whose indices are the same on every rank;
    the future resolves to `out` holding the mean (zeros off the shared positions)."""
    values = payload.values.clone()
    summed = allreduce_mean(values, group)
    idx = payload.indices.long()

    def scatter(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        out.zero_()
        out[idx] = fut.value().to(out.dtype)
        return out

    return summed.then(scatter)


def sent_bytes(payload: Payload, shared_indices: bool) -> int:
    """Bytes this rank contributes to the collective `reduce_payload` runs for `payload`.

    This is what travels here, not the payload's wire encoding: the all-gather ships fixed-size
    int32/int64 positions (gap coding would give ranks different sizes), and shared-seed
    randomk ships values only, since every rank derives the positions itself.
    """
    values = payload.values.numel() * payload.values.element_size()
    if isinstance(payload, Sparse) and not shared_indices:
        return values + payload.indices.numel() * payload.indices.element_size()
    return values


def reduce_payload(
    payload: Payload,
    out: torch.Tensor,
    shared_indices: bool,
    group: dist.ProcessGroup | None = None,
) -> torch.futures.Future[torch.Tensor]:
    """Pick the collective a payload needs; the future resolves to `out` (flat, the payload's
    size) overwritten with the mean. `out` may be the tensor the payload was compressed from."""
    if isinstance(payload, Dense):
        values = payload.values.clone()
        return allreduce_mean(values, group).then(lambda fut: out.copy_(fut.value()))
    if shared_indices:
        return allreduce_shared_mean(payload, out, group)
    return allgather_sparse_mean(payload, out, group)
