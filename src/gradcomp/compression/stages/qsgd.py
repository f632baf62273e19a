"""QSGD (Alistarh et al., 2017): s levels, stochastic rounding, a norm scale per bucket.

Each bucket of `bucket` consecutive values v is sent as its L2 norm ||v|| (float32) and, per
value, a signed integer level l in [-s, s]; the receiver restores ||v|| * l / s. With
x = s |v_i| / ||v|| the level's magnitude is floor(x) + 1 with probability x - floor(x), else
floor(x), so E[restored] = v: the quantiser is unbiased, and its variance per bucket is at most
min(d / s^2, sqrt(d) / s) ||v||^2 for d values. Levels travel as int8 (s <= 127) or int16, the
paper's Elias coding of them is not used, so a float32 tensor shrinks about 4x (2x for s > 127).

Payload kind 2 (`QSGDPayload`), its wire fields and its all-gather live here too: the levels
in `values`, and in `extra` the parameters and scales, little-endian:
  u32 s | u32 bucket | ceil(numel / bucket) x f32 norm
Decoding refuses anything else: a level beyond s (it would scale a value past its bucket's
norm), a norm that is negative or not finite, or sizes the header does not imply.

Stochastic rounding draws from the pipeline's seeded generator (`ctx.generator`, as rtopk's
random pick does): reproducible from the pipeline's seed, checkpointed with its state. Senders
round independently, so their errors average down: the DDP hook seeds each rank's pipeline by
(job seed, rank), a federated client's by (job seed, client, round).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from gradcomp.compression.payload import (
    DTYPE_CODES,
    Fields,
    Payload,
    WireError,
    from_bytes,
    register_kind,
    tensor_bytes,
    wire_dtype,
)
from gradcomp.compression.spec import SpecError
from gradcomp.compression.stages.base import Stage, StepContext, Work, dense_only, register

MAX_LEVELS = 2**15 - 1
MAX_BUCKET = 2**31 - 1
_PARAMS = struct.Struct("<II")


def level_dtype(levels: int) -> torch.dtype:
    """The narrowest signed integer that holds every level in [-levels, levels]."""
    return torch.int8 if levels <= 127 else torch.int16


def quantize(values: torch.Tensor, levels: int, bucket: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed levels, float32 norm per bucket) of flat `values`, rounded stochastically."""
    n = values.numel()
    buckets = math.ceil(n / bucket)
    pad = buckets * bucket - n
    v = (F.pad(values, (0, pad)) if pad else values).reshape(buckets, bucket)
    norms = torch.linalg.vector_norm(v, dim=1).to(torch.float32)  # the scale as sent
    scale = torch.where(norms > 0, levels / norms.clamp_min(1e-30), torch.zeros_like(norms))
    x = v.abs().mul_(scale.to(v.dtype)[:, None]).clamp_(max=levels)
    low = x.floor()
    frac = x.sub_(low)  # in place, as every step below: few passes over a large gradient
    up = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype).lt_(frac)  # 1.0: round up
    magnitude = low.add_(up)
    return magnitude.copysign_(v).reshape(-1)[:n].to(level_dtype(levels)), norms


def dequantize(q: torch.Tensor, norms: torch.Tensor, levels: int, bucket: int) -> torch.Tensor:
    """The float32 values a receiver restores from levels and norms (what the sender's error
    feedback keeps the difference to, computed the same way on both sides)."""
    n = q.numel()
    x = F.pad(q.to(torch.float32), (0, norms.numel() * bucket - n)).view(-1, bucket)
    return (x * (norms / levels)[:, None]).reshape(-1)[:n]


@register_kind
@dataclass(frozen=True, eq=False)
class QSGDPayload(Payload):
    """Levels (`values`, int8/int16) and one float32 norm per bucket of the restored tensor."""

    values: torch.Tensor
    norms: torch.Tensor
    levels: int
    bucket: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: ClassVar[int] = 2
    kind_name: ClassVar[str] = "qsgd"

    def wire_parts(self) -> tuple[int, int, int]:
        return _PARAMS.size + 4 * self.norms.numel(), self.values.numel() * self.values.element_size(), 0

    def to_dense(self) -> torch.Tensor:
        return dequantize(self.values, self.norms, self.levels, self.bucket).to(self.dtype).reshape(self.shape)

    def to_fields(self) -> Fields:
        extra = _PARAMS.pack(self.levels, self.bucket) + tensor_bytes(self.norms)
        vcode = DTYPE_CODES[self.values.dtype]
        shape = tuple(self.shape)
        return Fields(self.kind, DTYPE_CODES[self.dtype], vcode, 0, shape, tensor_bytes(self.values), b"", extra)

    @classmethod
    def from_fields(cls, f: Fields, numel: int, dtype: torch.dtype) -> QSGDPayload:
        if f.index_dtype != 0 or f.indices:
            raise WireError("qsgd payload must not carry indices")
        if len(f.extra) < _PARAMS.size:
            raise WireError(f"qsgd payload needs {_PARAMS.size} bytes of levels and bucket, got {len(f.extra)}")
        levels, bucket = _PARAMS.unpack_from(f.extra, 0)
        if not 1 <= levels <= MAX_LEVELS or not 1 <= bucket <= MAX_BUCKET:
            raise WireError(f"qsgd levels {levels} must be in [1, {MAX_LEVELS}], bucket {bucket} in [1, {MAX_BUCKET}]")
        buckets = math.ceil(numel / bucket)
        if len(f.extra) != _PARAMS.size + 4 * buckets:
            raise WireError(f"qsgd extra is {len(f.extra)} bytes; {buckets} bucket norms need {8 + 4 * buckets}")
        norms = from_bytes(f.extra[_PARAMS.size :], torch.float32, buckets, "qsgd norms")
        if buckets and not (bool(torch.isfinite(norms).all()) and float(norms.min()) >= 0):
            raise WireError("qsgd norm scales must be finite and >= 0")
        want = level_dtype(levels)
        vdtype = wire_dtype(f.value_dtype, f"qsgd value dtype (levels {levels} travel as {want})", (want,))
        q = from_bytes(f.values, vdtype, numel, "qsgd levels")
        if numel and (int(q.min()) < -levels or int(q.max()) > levels):
            raise WireError(f"qsgd levels span [{int(q.min())}, {int(q.max())}], beyond the +-{levels} declared")
        return cls(q, norms, levels, bucket, tuple(f.shape), dtype)

    def collective(self, shared_indices: bool) -> str:
        """Ranks' norms differ, so levels cannot be summed: gather levels and norms (as torch's
        quantisation hook gathers values and scales) and dequantize every rank's."""
        return "allgather"

    def pack(self) -> torch.Tensor:
        return torch.cat([self.values.contiguous().view(torch.uint8), self.norms.contiguous().view(torch.uint8)])

    def gather_mean(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        split = self.values.numel() * self.values.element_size()
        out.zero_()
        for row in rows:
            q = row[:split].contiguous().view(self.values.dtype)
            norms = row[split:].clone().view(torch.float32)  # a copy: the slice starts at any byte
            out.add_(dequantize(q, norms, self.levels, self.bucket).to(out.dtype))
        return out.div_(rows.shape[0])


@register
@dataclass
class QSGD(Stage):
    """Quantise to `levels` (s) levels per sign with stochastic rounding, one norm scale per
    `bucket` values; unbiased. Works on the whole tensor: no selection or cast beside it, and
    only `ef` after it (it sends its own payload kind)."""

    levels: int = 127
    bucket: int = 512
    name: ClassVar[str] = "qsgd"
    role: ClassVar[str] = "quantize"

    def check(self) -> None:
        if not 1 <= self.levels <= MAX_LEVELS:
            self._fail("levels", f"must be in [1, {MAX_LEVELS}], got {self.levels}")
        if not 1 <= self.bucket <= MAX_BUCKET:
            self._fail("bucket", f"must be in [1, {MAX_BUCKET}], got {self.bucket}")

    def check_pipeline(self, stages: list[Stage]) -> None:
        beside = [s.name for s in stages if s.role in ("select", "cast")]
        if beside:
            raise SpecError(f"'qsgd' quantises the whole tensor and sets its own wire type; drop {', '.join(beside)}")
        after = [s.name for s in stages[stages.index(self) + 1 :] if s.role != "feedback"]
        if after:
            raise SpecError(f"'qsgd' sends its own payload kind, so only 'ef' may follow it, got {', '.join(after)}")

    def apply(self, work: Work, ctx: StepContext) -> Work:
        dense_only(self, work)
        q, norms = quantize(work.values, self.levels, self.bucket, ctx.generator)
        restored = dequantize(q, norms, self.levels, self.bucket).to(work.values.dtype)

        def encoded(shape: tuple[int, ...], dtype: torch.dtype) -> QSGDPayload:
            return QSGDPayload(q, norms, self.levels, self.bucket, shape, dtype)

        return Work(restored, None, work.numel, work.wire_dtype, encoded)
