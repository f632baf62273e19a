"""Pure functions on client updates: decode + validate, clip, weight, average, noise.

Nothing here knows about gRPC, rounds or clients, so every rule is testable on its own and
the simulation reuses the same code. Validation raises `Rejected(reason, message)`; the
reason is one of `gradcomp.metrics.REJECT_REASONS` and the gRPC layer maps it to a status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gradcomp.compression import Fields, WireError, dense_nbytes, from_fields, to_fields
from gradcomp.compression.payload import DIM_BYTES, DTYPE_CODES, HEADER_BYTES, Dense, Payload, Sparse, numel_of

Params = dict[str, torch.Tensor]


class Rejected(ValueError):
    """An update that must not touch the model; `reason` is a metrics label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return numel_of(self.shape)


def model_spec(params: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """What every update must look like: one entry per parameter, same shape and dtype."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in params.items()}


def fields_nbytes(f: Fields) -> int:
    """Wire bytes of one tensor (same count as `Payload.nbytes`)."""
    return HEADER_BYTES + DIM_BYTES * len(f.shape) + len(f.values) + len(f.indices)


def update_nbytes(update: Mapping[str, Fields | Payload]) -> int:
    """Wire bytes of a whole update, whether it arrived as protobuf fields or as payloads."""
    return sum(v.nbytes if isinstance(v, Dense | Sparse) else fields_nbytes(v) for v in update.values())


def dense_update_nbytes(spec: Mapping[str, TensorSpec]) -> int:
    """What an uncompressed update of this model costs on the wire."""
    return sum(dense_nbytes(s.shape, s.dtype) for s in spec.values())


def decode_update(
    update: Mapping[str, Fields | Payload],
    spec: Mapping[str, TensorSpec],
    *,
    max_bytes: int | None = None,
) -> Params:
    """Validate a client's update against the model and restore it as dense tensors.

    Checks, in order: size limit (too_large), the set of tensor names and each tensor's wire
    format (malformed), shapes (bad_shape), dtypes (bad_dtype), finite values (non_finite).
    """
    if max_bytes is not None:
        nbytes = update_nbytes(update)
        if nbytes > max_bytes:
            raise Rejected("too_large", f"update is {nbytes} bytes; the limit is {max_bytes}")
    missing = sorted(set(spec) - set(update))
    extra = sorted(set(update) - set(spec))
    if missing or extra:
        raise Rejected(
            "malformed", f"update tensors do not match the model: missing {missing[:5]}, unknown {extra[:5]}"
        )
    out: Params = {}
    for name, s in spec.items():
        item = update[name]
        fields = to_fields(item) if isinstance(item, Dense | Sparse) else item
        try:
            payload = from_fields(fields, max_numel=s.numel)
        except WireError as err:
            raise Rejected("malformed", f"tensor {name!r}: {err}") from None
        if tuple(fields.shape) != s.shape:
            raise Rejected("bad_shape", f"tensor {name!r}: shape {tuple(fields.shape)}, expected {s.shape}")
        if fields.dtype != DTYPE_CODES[s.dtype]:
            raise Rejected("bad_dtype", f"tensor {name!r}: dtype code {fields.dtype}, expected {DTYPE_CODES[s.dtype]}")
        # Checked in the model's dtype: a finite float64 value such as 1e300 turns into inf when restored.
        values = payload.values.to(s.dtype)
        if not bool(torch.isfinite(values).all()):
            raise Rejected("non_finite", f"tensor {name!r} holds NaN or infinite values")
        out[name] = payload.to_dense()
    return out


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of an update taken together (the quantity DP clipping bounds)."""
    if not update:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in update.values()])))


def clip_update(update: Mapping[str, torch.Tensor], clip: float) -> tuple[Params, float]:
    """Scale the whole update to L2 norm <= clip (one client's contribution); returns (update, old norm)."""
    norm = global_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def weighted_average(updates: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> Params:
    """FedAvg weighting: sum_i w_i * u_i / sum_i w_i (weights are example counts)."""
    if not updates:
        raise ValueError("cannot average zero updates")
    total = float(sum(w for w, _ in updates))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    keys = list(updates[0][1])
    out = {k: torch.zeros_like(updates[0][1][k], dtype=torch.float32) for k in keys}
    for w, u in updates:
        for k in keys:
            out[k].add_(u[k].float(), alpha=w / total)
    return out


def central_dp_average(
    updates: Sequence[Mapping[str, torch.Tensor]],
    clip: float,
    noise_multiplier: float,
    expected_clients: int,
    generator: torch.Generator | None = None,
) -> Params:
    """DP-FedAvg with a fixed denominator (McMahan et al. 2018): (sum clip(u_i) + N(0, (z*clip)^2)) / m.

    Dividing by the expected number of clients m (not the number that arrived) keeps the
    sensitivity of the sum at `clip`, so the noise multiplier is exactly `noise_multiplier`.
    """
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    keys = list(updates[0])
    total = {k: torch.zeros_like(updates[0][k], dtype=torch.float32) for k in keys}
    for u in updates:
        clipped, _ = clip_update(u, clip)
        for k in keys:
            total[k].add_(clipped[k].float())
    std = noise_multiplier * clip
    for k in keys:
        if std > 0:
            total[k].add_(torch.randn(total[k].shape, generator=generator) * std)
        total[k].div_(max(expected_clients, 1))
    return total
