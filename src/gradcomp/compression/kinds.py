"""The two built-in payload kinds: `Dense` (kind 0, all values) and `Sparse` (kind 1, selected
positions as ascending gaps, see indices.py). Each owns its wire fields, its strict decoding
and its data-parallel collective (see payload.Payload for the interface)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gradcomp.compression.indices import CODE_GAPS, GapError, canonical_order, decode_gaps, encode_gaps, gap_width
from gradcomp.compression.payload import (
    CODE_DTYPES,
    DTYPE_CODES,
    FLOAT_DTYPES,
    Fields,
    Payload,
    WireError,
    from_bytes,
    index_dtype_for,
    itemsize,
    register_kind,
    tensor_bytes,
    wire_dtype,
)


def float_values(f: Fields) -> torch.Tensor:
    """A float kind's values, checked: a known float dtype and a whole number of items."""
    vdtype = wire_dtype(f.value_dtype, "value dtype", FLOAT_DTYPES)
    if len(f.values) % vdtype.itemsize:
        raise WireError(f"values: {len(f.values)} bytes is not a whole number of {vdtype} items")
    return from_bytes(f.values, vdtype, len(f.values) // vdtype.itemsize, "values")


def refuse_extra(f: Fields, kind: str) -> None:
    if f.extra:
        raise WireError(f"{kind} payload must not carry extra bytes, got {len(f.extra)}")


@register_kind
@dataclass(frozen=True, eq=False)
class Dense(Payload):
    """All values, flattened. `values` is 1-D; `shape`/`dtype` describe the restored tensor."""

    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: ClassVar[int] = 0
    kind_name: ClassVar[str] = "dense"

    def to_dense(self) -> torch.Tensor:
        return self.values.to(self.dtype).reshape(self.shape)

    def to_fields(self) -> Fields:
        vcode = DTYPE_CODES[self.values.dtype]
        return Fields(self.kind, DTYPE_CODES[self.dtype], vcode, 0, tuple(self.shape), tensor_bytes(self.values), b"")

    @classmethod
    def from_fields(cls, f: Fields, numel: int, dtype: torch.dtype) -> Dense:
        values = float_values(f)
        if f.index_dtype != 0 or f.indices:
            raise WireError("dense payload must not carry indices")
        refuse_extra(f, "dense")
        if values.numel() != numel:
            raise WireError(f"dense payload has {values.numel()} values for shape {f.shape} ({numel} elements)")
        return cls(values, tuple(f.shape), dtype)

    def restore_into(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return out.copy_(values)


@register_kind
@dataclass(frozen=True, eq=False)
class Sparse(Payload):
    """Selected positions (flat, unique) and their values; every other entry is zero."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: ClassVar[int] = 1
    kind_name: ClassVar[str] = "sparse"

    def wire_parts(self) -> tuple[int, int, int]:
        count = self.values.numel()
        return 0, count * self.values.element_size(), count * gap_width(self.indices)

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.values.device)
        out[self.indices.long()] = self.values.to(self.dtype)
        return out.reshape(self.shape)

    @property
    def positions(self) -> torch.Tensor:
        return self.indices

    def to_fields(self) -> Fields:
        indices, values = self.indices, self.values
        order = canonical_order(indices)
        if order is not None:  # the wire carries positions in ascending order
            indices, values = indices.long()[order], values[order]
        code, gaps = encode_gaps(indices)
        return Fields(
            self.kind,
            DTYPE_CODES[self.dtype],
            DTYPE_CODES[values.dtype],
            code,
            tuple(self.shape),
            tensor_bytes(values),
            tensor_bytes(gaps),
        )

    @classmethod
    def from_fields(cls, f: Fields, numel: int, dtype: torch.dtype) -> Sparse:
        values = float_values(f)
        refuse_extra(f, "sparse")
        count = values.numel()
        idtype, gapped = index_coding(f.index_dtype)
        if count > numel:
            raise WireError(f"sparse payload has {count} values but the tensor has only {numel} elements")
        raw = from_bytes(f.indices, idtype, count, "indices")
        if gapped:
            try:
                indices = decode_gaps(raw, numel).to(index_dtype_for(numel))
            except GapError as err:
                raise WireError(str(err)) from None
        else:  # absolute positions (codes 5 / 6): any order, so check range and repeats
            indices = raw
            if count and (int(indices.min()) < 0 or int(indices.max()) >= numel):
                raise WireError(f"sparse index out of range [0, {numel})")
            if count and torch.unique(indices).numel() != count:
                raise WireError("sparse payload repeats an index")
        return cls(indices, values, tuple(f.shape), dtype)

    @classmethod
    def index_nbytes(cls, count: int, index_code: int) -> int:
        return count * itemsize(index_coding(index_code)[0])

    def collective(self, shared_indices: bool) -> str:
        """Shared positions (seeded randomk, leader mode): all-reduce the values; otherwise every
        rank's (positions, values) are gathered and scatter-added."""
        return "allreduce" if shared_indices else "allgather"

    def restore_into(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out.zero_()
        out[self.indices.long()] = values.to(out.dtype)
        return out

    def pack(self) -> torch.Tensor:
        """Fixed-width positions then values (gap coding would give ranks different sizes)."""
        idx = self.indices.contiguous().view(torch.uint8)
        val = self.values.contiguous().view(torch.uint8)
        return torch.cat([idx, val])

    def gather_mean(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One scatter-add of every rank's values, scaled first, so the dense result takes one
        zero-fill and no pass of its own."""
        idx_bytes = self.values.numel() * self.indices.element_size()
        idx = rows[:, :idx_bytes].contiguous().view(self.indices.dtype).reshape(-1)
        val = rows[:, idx_bytes:].contiguous().view(self.values.dtype).reshape(-1)
        out.zero_()
        return out.index_add_(0, idx.long(), torch.div(val.to(out.dtype), rows.shape[0]))


def index_coding(code: int) -> tuple[torch.dtype, bool]:
    """(dtype of the index bytes, whether they are gaps) for an index code."""
    if code in CODE_GAPS:
        return CODE_GAPS[code], True
    if CODE_DTYPES.get(code) in (torch.int32, torch.int64):
        return CODE_DTYPES[code], False
    known = sorted([*CODE_GAPS, DTYPE_CODES[torch.int32], DTYPE_CODES[torch.int64]])
    raise WireError(f"unknown index dtype code {code}; expected one of {known}")
