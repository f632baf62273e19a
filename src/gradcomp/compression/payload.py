"""Payloads: what a compression pipeline sends, and the open registry of payload kinds.

A payload kind is a `Payload` subclass registered with `@register_kind` under a stable wire
code. It owns everything kind-specific: its wire fields (`to_fields` / `from_fields`, strict:
a peer's bytes never yield a wrong tensor or an allocation the bytes do not back), its size
(`wire_parts`), how to restore the dense tensor, and the collective it needs in data-parallel
training (`collective`, `pack`, `gather_mean`). Built-in kinds: `Dense` and `Sparse`
(kinds.py); a stage may define its own beside it (the qsgd stage does).

`dtype` is the dtype of the tensor that decompression restores; `values` may be in a
narrower wire dtype (fp16/bf16 stages, integer levels). `nbytes` is the exact encoded size
(see wire.py), computed only by `wire_nbytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from gradcomp.errors import GradcompError

# Stable wire codes; never renumber (they are part of the protocol).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int32: 5,
    torch.int64: 6,
    torch.int8: 7,
    torch.int16: 8,
}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT32_MAX = 2**31 - 1

# Header: magic, kind, dtype, value dtype, index dtype, ndim, count (see wire.py).
HEADER_BYTES = 4 + 5 + 8
DIM_BYTES = 8
EXTRA_LEN_BYTES = 4  # u32 length of `extra`, on the wire only when a kind sends extra bytes


class WireError(GradcompError, ValueError):
    """Bytes or fields that do not describe a valid payload."""


def wire_nbytes(ndim: int, extra: int, values: int, indices: int) -> int:
    """The one count of a tensor's bytes on the wire, from the sizes of its parts."""
    return HEADER_BYTES + DIM_BYTES * ndim + (EXTRA_LEN_BYTES + extra if extra else 0) + values + indices


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices whenever every position fits, int64 otherwise."""
    return torch.int32 if numel <= INT32_MAX else torch.int64


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Fields:
    """The protocol-level description of a payload (one protobuf `Tensor`). `extra` holds what a
    kind needs beyond values and indices (e.g. qsgd's levels and norm scales), laid out by the kind."""

    kind: int
    dtype: int
    value_dtype: int
    index_dtype: int
    shape: tuple[int, ...]
    values: bytes
    indices: bytes
    extra: bytes = b""

    @property
    def nbytes(self) -> int:
        """Exact size of this tensor on the wire (the same count as its payload's `nbytes`)."""
        return wire_nbytes(len(self.shape), len(self.extra), len(self.values), len(self.indices))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes (b"" when empty)."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def from_bytes(data: bytes | memoryview, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
    """`count` items of `dtype` from exactly that many bytes; the copy is as large as `data`, so a
    declared count can never make it allocate more than the peer actually sent."""
    size = itemsize(dtype)
    if len(data) != count * size:
        raise WireError(f"{what}: expected {count * size} bytes for {count} x {dtype}, got {len(data)}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def wire_dtype(code: int, what: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """The dtype a wire code names, refused unless it is one of `allowed`."""
    dt = CODE_DTYPES.get(code)
    if dt is None or dt not in allowed:
        names = ", ".join(f"{DTYPE_CODES[d]}={d}" for d in allowed)
        raise WireError(f"unknown {what} code {code}; expected one of {names}")
    return dt


class Payload:
    """A compressed tensor of one kind. Subclasses are frozen dataclasses with at least
    `values` (1-D), `shape` and `dtype` (the restored tensor's)."""

    kind: ClassVar[int]  # stable wire code, see KINDS
    kind_name: ClassVar[str]
    restored_dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES  # what `dtype` may be on the wire
    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact size of this payload on the wire, header included."""
        return wire_nbytes(len(self.shape), *self.wire_parts())

    def wire_parts(self) -> tuple[int, int, int]:
        """Bytes of (extra, values, indices) as `to_fields` will write them."""
        return 0, self.values.numel() * self.values.element_size(), 0

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def positions(self) -> torch.Tensor | None:
        """The flat positions this payload carries values for; None when it carries every one."""
        return None

    # --- wire --------------------------------------------------------------------------------
    def to_fields(self) -> Fields:
        raise NotImplementedError

    @classmethod
    def from_fields(cls, f: Fields, numel: int, dtype: torch.dtype) -> Payload:
        """Build from fields whose shape (`numel` elements) and restored `dtype` are checked
        already; check everything else and raise `WireError` naming what is wrong."""
        raise NotImplementedError

    @classmethod
    def index_nbytes(cls, count: int, index_code: int) -> int:
        """Bytes of indices that follow `count` values in the byte encoding (wire.decode)."""
        return 0

    # --- the collective it needs in data-parallel training -----------------------------------
    def collective(self, shared_indices: bool) -> str:
        """ "allreduce" when the ranks' `values` may be summed position by position (every rank
        sends the same layout), else "allgather" (each rank's `pack()` is gathered)."""
        return "allreduce"

    def collective_nbytes(self, shared_indices: bool) -> int:
        """Bytes this rank hands to that collective (not the wire encoding: see `pack`)."""
        if self.collective(shared_indices) == "allreduce":
            return self.values.numel() * self.values.element_size()
        return self.pack().numel()

    def restore_into(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Write into flat `out` the dense tensor this payload restores with `values` (reduced
        across ranks) in place of its own; an "allreduce" kind must implement it."""
        raise NotImplementedError(f"payload kind {self.kind_name!r} cannot be all-reduced")

    def pack(self) -> torch.Tensor:
        """Everything the receivers need as one flat uint8 tensor of a size every rank shares
        (equal-sized tensors, same stage arguments), so one all-gather moves it."""
        raise NotImplementedError(f"payload kind {self.kind_name!r} cannot be all-gathered")

    def gather_mean(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write into flat `out` the mean of the payloads packed in `rows` (world x bytes)."""
        raise NotImplementedError(f"payload kind {self.kind_name!r} cannot be all-gathered")


KINDS: dict[int, type[Payload]] = {}
P = TypeVar("P", bound=type[Payload])
MAX_KIND = 255  # the byte encoding keeps the kind in one byte


def register_kind(cls: P) -> P:
    """Class decorator: make a payload kind decodable under its wire code `cls.kind`. Codes are
    part of the protocol: a new kind takes the next free code and never reuses one."""
    code = cls.kind
    if not 0 <= code <= MAX_KIND:
        raise TypeError(f"payload kind code {code} of {cls.__name__} must be in [0, {MAX_KIND}]")
    if code in KINDS and KINDS[code] is not cls:
        raise TypeError(f"payload kind code {code} is taken by {KINDS[code].__name__}, not free for {cls.__name__}")
    KINDS[code] = cls
    return cls


def kind_class(code: int) -> type[Payload]:
    """The registered kind of a wire code, or a `WireError` listing the known ones."""
    cls = KINDS.get(code)
    if cls is None:
        known = ", ".join(f"{c} ({k.kind_name})" for c, k in sorted(KINDS.items()))
        raise WireError(f"unknown payload kind {code}; expected one of {known}")
    return cls


def dense_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """What an uncompressed payload of this tensor costs on the wire (the baseline)."""
    return wire_nbytes(len(shape), 0, numel_of(shape) * itemsize(dtype), 0)
