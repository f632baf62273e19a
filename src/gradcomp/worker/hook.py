"""The DDP communication hook: compress each gradient bucket, run the right collective,
return the average as a future so communication overlaps the rest of the backward pass.

One `CompressionState` per model. Error-feedback memory is keyed by the *parameters* in a
bucket, not by the bucket's index, because DDP rebuilds its buckets after the first step
(in gradient-ready order): when a new layout appears, each parameter's residual is carried
over from the bucket it used to live in, so no feedback is lost or misapplied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradcomp.compression import Pipeline, SpecError, build
from gradcomp.compression.payload import index_dtype_for
from gradcomp.compression.stages import Chooser
from gradcomp.worker import lowrank
from gradcomp.worker.collectives import (
    allreduce_mean,
    broadcast_positions,
    collective_kind,
    reduce_payload,
    sent_bytes,
    wire_bytes,
    world_size,
)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s pipeline generator: distinct per rank, fixed by the job seed."""
    return (seed * 1_000_003 + rank) % 2**63


@dataclass
class StepTraffic:
    """What one rank handed to collectives since the last `take_traffic()`, in all
    (`bytes_sent`) and per kind of collective (`by_collective`: allreduce, allgather, broadcast)."""

    bytes_sent: int = 0
    dense_bytes: int = 0
    buckets: int = 0
    by_collective: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.by_collective[kind] = self.by_collective.get(kind, 0) + nbytes

    @property
    def ratio(self) -> float:
        """Dense bytes per byte sent (1.0 when nothing was sent)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 1.0

    def wire_bytes(self, world: int) -> float:
        """Bytes this rank transmits under ring all-reduce/all-gather (see collectives.wire_bytes)."""
        return wire_bytes(dict(self.by_collective), world)


@dataclass
class _Layout:
    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def offsets(self) -> dict[str, tuple[int, int]]:
        out, at = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = (at, size)
            at += size
        return out


@dataclass
class CompressionState:
    """Per-model hook state: the pipeline (with its EF memory), warm-up, traffic counters.

    `step` counts completed all-reduce rounds (one per backward through DDP) and decides
    when the dense warm-up ends; `take_traffic()` hands the loop this step's bytes.
    """

    pipeline: Pipeline
    names: dict[int, str]
    group: dist.ProcessGroup | None = None
    warmup_steps: int = 0
    step: int = 0
    traffic: StepTraffic = field(default_factory=StepTraffic)
    lowrank: lowrank.PowerSGDState | None = None  # torch's PowerSGD state, for a `powersgd` spec
    _lowrank_keys: dict[int, str] = field(default_factory=dict)  # bucket index -> its layout's key
    _layouts: dict[str, _Layout] = field(default_factory=dict)
    _home: dict[str, str] = field(default_factory=dict)  # parameter name -> key holding its residual

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        spec: str | list[Any],
        seed: int = 0,
        warmup_steps: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> CompressionState:
        """State for `model` (the DDP module or the module it wraps: names are normalised).

        The pipeline's generator is seeded by (`seed`, this rank), so stochastic stages (qsgd's rounding,
        rtopk's pick) draw independently on each rank and their errors average down over ranks; what ranks
        must agree on (randomk's positions) comes from the stage's own seed, key and step."""
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        names = {id(p): name for name, p in module.named_parameters()}
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        pipeline = build(spec, seed=rank_seed(seed, rank))
        if pipeline.dp is not None:
            # The pipeline's generator is seeded from the job's public seed, so noise drawn from it would
            # be known to anyone holding the job file: refused, not weakened.
            raise SpecError(
                f"a dp stage is refused in a data-parallel hook ({pipeline.spec}): its noise would come from the "
                "job's public seed; use example-level DP-SGD (`gradcomp train`'s dp section, worker/dp.py)"
            )
        stage = pipeline.lowrank
        if stage is not None and warmup_steps:
            raise SpecError(
                f"'powersgd' has its own dense warm-up: use powersgd(start_iter={stage.start_iter + warmup_steps}) "
                f"instead of warmup_dense_steps={warmup_steps}"
            )
        powersgd = lowrank.make_state(stage, group) if stage is not None else None
        return cls(pipeline, names, group=group, warmup_steps=warmup_steps, lowrank=powersgd)

    # --- keys and error-feedback migration --------------------------------------------------
    def bucket_key(self, params: list[torch.Tensor], sizes: list[int]) -> str:
        names = tuple(self.names.get(id(p), f"#{i}") for i, p in enumerate(params))
        digest = hashlib.sha1("\0".join(names).encode()).hexdigest()[:12]
        key = f"bucket-{digest}"
        if key not in self._layouts:
            self._layouts[key] = _Layout(names, tuple(sizes))
        return key

    def carry_residual(self, key: str, flat: torch.Tensor) -> torch.Tensor:
        """Add to `flat` the residual its parameters left in the buckets of an older layout.

        Adding it to the input of a key with empty memory is exactly what EF would have done
        had the memory been stored under the new key, so the migration is lossless.
        """
        layout = self._layouts.get(key)
        if not self.pipeline.ef or layout is None:  # not a DDP bucket (e.g. the DP path's flat gradient)
            return flat
        moved: set[str] = set()
        out = flat
        for name, (start, size) in layout.offsets().items():
            home = self._home.get(name)
            self._home[name] = key
            if home is None or home == key:
                continue
            old = self.pipeline.residual(home)
            old_layout = self._layouts.get(home)
            # A residual kept only over positions chosen before dp (randomk | dp) has no
            # per-parameter layout; such memory is dropped instead of misplaced.
            if old is not None and old_layout is not None and old.numel() == sum(old_layout.sizes):
                o_start, o_size = old_layout.offsets()[name]
                if o_size == size:
                    if out is flat:
                        out = flat.clone()
                    out[start : start + size] += old[o_start : o_start + size].to(out.dtype)
            moved.add(home)
        still_used = set(self._home.values())
        for home in moved:
            if home not in still_used:  # no parameter lives there any more: free its memory
                self.pipeline.reset(home)
                self._layouts.pop(home, None)
        return out

    # --- the work ---------------------------------------------------------------------------
    @property
    def compressing(self) -> bool:
        """Whether this round compresses (pipeline is not identity and the dense warm-up is over)."""
        return not self.pipeline.is_identity and self.step >= self.warmup_steps

    def reduce(self, flat: torch.Tensor, key: str, slot: int = 0) -> torch.futures.Future[torch.Tensor]:
        """Compress `flat` under `key`, start the collective, resolve to the flat mean.

        `flat` is the caller's to overwrite (a DDP bucket, or the DP path's fresh gradient):
        the mean is written into it, and the future resolves to it. `slot` (the bucket's
        index in the round) staggers leader mode's leaders across a round's buckets.
        """
        dense = flat.numel() * flat.element_size()  # what an uncompressed all-reduce moves
        self.traffic.dense_bytes += dense
        self.traffic.buckets += 1
        if not self.compressing:
            self.traffic.add("allreduce", dense)
            return allreduce_mean(flat, self.group)  # in place, like DDP's default hook
        shared = self.pipeline.shared_indices
        choose = self._chooser(slot, index_dtype_for(flat.numel()), flat.device) if self.pipeline.leader else None
        payload = self.pipeline.compress(self.carry_residual(key, flat), key=key, choose=choose)
        self.traffic.add(collective_kind(payload, shared), sent_bytes(payload, shared))
        return reduce_payload(payload, flat, shared, self.group)

    def leader_of(self, slot: int = 0) -> int:
        """The rank (in `group`) that picks positions for bucket `slot` in this round: it
        rotates with the round, so each rank leads equally often (cyclic, as in ScaleCom)."""
        return (self.step + slot) % world_size(self.group)

    def _chooser(self, slot: int, dtype: torch.dtype, device: torch.device) -> Chooser:
        leader = self.leader_of(slot)

        def choose(k: int, own: Callable[[], torch.Tensor]) -> torch.Tensor:
            idx = broadcast_positions(k, own, leader, dtype, device, self.group)
            if dist.get_rank(self.group) == leader:
                self.traffic.add("broadcast", idx.numel() * idx.element_size())
            return idx

        return choose

    def reduce_lowrank(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """One bucket through torch's PowerSGD hook, its all-reduced bytes counted."""
        assert self.lowrank is not None
        params = bucket.parameters()
        key = self.bucket_key(params, [p.numel() for p in params])
        if self._lowrank_keys.get(bucket.index(), key) != key:
            # torch keys its residual and warm-start factors by bucket index; a new layout
            # under the same index (DDP's first step after a restore) would misplace them.
            lowrank.forget_bucket(self.lowrank, bucket.index())
        self._lowrank_keys[bucket.index()] = key
        buffer = bucket.buffer()
        self.traffic.dense_bytes += buffer.numel() * buffer.element_size()
        self.traffic.buckets += 1
        fut, nbytes = lowrank.run_bucket(self.lowrank, bucket)
        self.traffic.add("allreduce", nbytes)
        return fut

    def end_step(self) -> None:
        """Count one finished all-reduce round (ends the dense warm-up after `warmup_steps`)."""
        self.step += 1

    def take_traffic(self) -> StepTraffic:
        """This step's traffic, resetting the counters: the loop calls it once per optimizer step."""
        out, self.traffic = self.traffic, StepTraffic()
        return out

    # --- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline.state_dict(),
            "step": self.step,
            "layouts": {k: (list(v.names), list(v.sizes)) for k, v in self._layouts.items()},
            "home": dict(self._home),
            "powersgd": lowrank.state_dict(self.lowrank) if self.lowrank is not None else None,
            "powersgd_buckets": dict(self._lowrank_keys),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipeline.load_state_dict(state["pipeline"])
        self.step = int(state["step"])
        self._layouts = {k: _Layout(tuple(n), tuple(s)) for k, (n, s) in state.get("layouts", {}).items()}
        self._home = dict(state.get("home", {}))
        if self.lowrank is not None and state.get("powersgd") is not None:
            lowrank.load_state_dict(self.lowrank, state["powersgd"])
            self._lowrank_keys = dict(state.get("powersgd_buckets", {}))


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: `ddp_model.register_comm_hook(state, compression_hook)`.

    The mean is written into the bucket's own buffer, and the future resolves to it.
    """
    if state.lowrank is not None:
        fut = state.reduce_lowrank(bucket)
    else:
        params = bucket.parameters()
        key = state.bucket_key(params, [p.numel() for p in params])
        fut = state.reduce(bucket.buffer(), key, slot=bucket.index())
    if bucket.is_last():
        state.end_step()
    return fut


# DDP checks the hook's annotations against the real types; with postponed annotations
# they would be strings, so set them explicitly.
compression_hook.__annotations__ = {
    "state": CompressionState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def register(
    ddp_model: nn.parallel.DistributedDataParallel,
    spec: str | list[Any],
    seed: int = 0,
    warmup_steps: int = 0,
    group: dist.ProcessGroup | None = None,
) -> CompressionState:
    """Attach the compression hook to a DDP model and return its state."""
    state = CompressionState.for_model(ddp_model, spec, seed=seed, warmup_steps=warmup_steps, group=group)
    ddp_model.register_comm_hook(state, compression_hook)
    return state
