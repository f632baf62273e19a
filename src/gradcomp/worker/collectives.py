"""The collectives a compressed gradient needs, averaging over ranks.

- dense all-reduce: every rank sends all values (`Dense` payloads, warm-up, no compression);
- sparse all-gather: ranks pick different positions (topk, rtopk), so each rank gathers
  every rank's fixed-size (indices, values) and scatter-adds them;
- shared-index all-reduce: every rank uses the same positions (seeded randomk, or leader
  mode after `broadcast_positions`), so only the k values are all-reduced.

Per rank, a ring all-reduce of m bytes transmits 2(P-1)/P m, an all-gather (P-1) m, and a
broadcast of m bytes (P-1) m in all, (P-1)/P m per rank: `wire_bytes` models exactly that.

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


def broadcast_positions(
    k: int,
    own: Callable[[], torch.Tensor],
    leader: int,
    dtype: torch.dtype,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Leader mode's first collective: rank `leader` (of `group`) computes `own()` (its k
    positions) and every rank returns them, as `dtype`.

    Blocking, unlike the others: the value all-reduce that follows needs the positions, and
    starting it from a future's callback could issue collectives in a different order on
    different ranks. The broadcast is k small integers, so the wait is one round trip.
    """
    if dist.get_rank(group) == leader:
        idx = own().to(dtype=dtype, device=device)
        if idx.shape != (k,):
            raise ValueError(f"leader's selection has shape {tuple(idx.shape)}, expected ({k},)")
    else:
        idx = torch.empty(k, dtype=dtype, device=device)
    src = leader if group is None else dist.get_global_rank(group, leader)
    dist.broadcast(idx, src=src, group=group)
    return idx


def collective_kind(payload: Payload, shared_indices: bool) -> str:
    """Which collective `reduce_payload` runs for `payload`: "allreduce" or "allgather"."""
    return "allgather" if isinstance(payload, Sparse) and not shared_indices else "allreduce"


def wire_bytes(handed: dict[str, float], world: int) -> float:
    """Bytes one rank transmits, given the bytes it handed to each kind of collective
    (averaged over ranks), for ring all-reduce / all-gather and any broadcast tree."""
    if world <= 1:
        return 0.0
    return (
        2 * (world - 1) / world * handed.get("allreduce", 0)
        + (world - 1) * handed.get("allgather", 0)
        + (world - 1) * handed.get("broadcast", 0)
    )


def sent_bytes(payload: Payload, shared_indices: bool) -> int:
    """Bytes this rank contributes to the collective `reduce_payload` runs for `payload`.

    This is what travels here, not the payload's wire encoding: the all-gather ships fixed-size
    int32/int64 positions (gap coding would give ranks different sizes), and shared-seed
    randomk and leader mode ship values only, since every rank has the positions (leader
    mode's broadcast of them is counted where it runs).
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
