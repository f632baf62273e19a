"""The collectives a compressed gradient needs, averaging over ranks.

- all-reduce of the values, when every rank's payload has the same layout: dense payloads
  (warm-up, no compression, fp16/bf16), and shared positions (seeded randomk, or leader mode
  after `broadcast_positions`), where only the k values travel;
- all-gather, when each rank's payload differs in layout or scale: each kind packs itself into
  fixed-size bytes and computes the mean from every rank's (sparse: (indices, values) scatter-
  added; qsgd: levels and norm scales dequantized).
A payload's kind says which (`Payload.collective`); nothing here knows the kinds.

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

from gradcomp.compression import Payload

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


def allgather_mean(
    payload: Payload, out: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.futures.Future[torch.Tensor]:
    """Gather every rank's `payload.pack()`; the future resolves to `out` holding the mean the
    payload's kind computes from the gathered rows (`gather_mean`).

    All ranks must pack the same number of bytes (true for a pipeline's payloads of equally
    sized tensors: `pipe.kept(n)` is fixed, and so are a kind's arguments).
    """
    world = world_size(group)
    packed = payload.pack()
    gathered = torch.empty(world * packed.numel(), dtype=torch.uint8, device=packed.device)
    work = _all_gather_single(gathered, packed, group=group, async_op=True)
    return _then(work, lambda: payload.gather_mean(gathered.view(world, -1), out))


def allreduce_values_mean(
    payload: Payload, out: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce only the payload's values (every rank's have the same layout: dense, or the
    same positions); the future resolves to `out` holding what the payload restores from the mean."""
    summed = allreduce_mean(payload.values.clone(), group)
    return summed.then(lambda fut: payload.restore_into(out, fut.value()))


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
    return payload.collective(shared_indices)


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

    This is what travels here, not the payload's wire encoding: the all-gather ships what the
    kind packs (sparse: fixed-size int32/int64 positions, since gap coding would give ranks
    different sizes), and shared-seed randomk and leader mode ship values only, since every rank
    has the positions (leader mode's broadcast of them is counted where it runs).
    """
    return payload.collective_nbytes(shared_indices)


COLLECTIVES = {"allreduce": allreduce_values_mean, "allgather": allgather_mean}


def reduce_payload(
    payload: Payload,
    out: torch.Tensor,
    shared_indices: bool,
    group: dist.ProcessGroup | None = None,
) -> torch.futures.Future[torch.Tensor]:
    """Run the collective the payload's kind asks for; the future resolves to `out` (flat, the
    payload's size) overwritten with the mean. `out` may be the tensor the payload was compressed from."""
    return COLLECTIVES[payload.collective(shared_indices)](payload, out, group)
