"""Payload <-> bytes, without pickle. The same fields map one-to-one onto the protobuf
`Tensor` message of the coordinator protocol (see `to_fields` / `from_fields`).

Layout (little-endian):
  magic "GCP1" | kind u8 (0 dense, 1 sparse) | dtype u8 | value dtype u8 |
  index code u8 (0 for dense) | ndim u8 | count u64 | ndim x u64 dims |
  count values | count indices (sparse only: ascending gaps, see indices.py; codes 5/6,
  absolute int32/int64 positions in any order, are still read)

Decoding checks everything a peer could get wrong or forge: magic, codes, sizes,
index range and uniqueness, so bad bytes raise `WireError` and never yield a wrong tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from gradcomp.compression.indices import CODE_GAPS, GapError, canonical_order, decode_gaps, encode_gaps
from gradcomp.compression.payload import (
    CODE_DTYPES,
    DTYPE_CODES,
    FLOAT_DTYPES,
    Dense,
    Payload,
    Sparse,
    index_dtype_for,
    numel_of,
)

MAGIC = b"GCP1"
_HEADER = struct.Struct("<4sBBBBBQ")
_DIM = struct.Struct("<Q")
MAX_NDIM = 8
MAX_NUMEL = 2**63 - 1
KIND_DENSE, KIND_SPARSE = 0, 1


class WireError(ValueError):
    """Bytes or fields that do not describe a valid payload."""


@dataclass(frozen=True)
class Fields:
    """The protocol-level description of a payload (one protobuf `Tensor`)."""

    kind: int
    dtype: int
    value_dtype: int
    index_dtype: int
    shape: tuple[int, ...]
    values: bytes
    indices: bytes


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def to_fields(payload: Payload) -> Fields:
    if isinstance(payload, Sparse):
        indices, values = payload.indices, payload.values
        order = canonical_order(indices)
        if order is not None:  # the wire carries positions in ascending order
            indices, values = indices.long()[order], values[order]
        code, gaps = encode_gaps(indices)
        return Fields(
            KIND_SPARSE,
            DTYPE_CODES[payload.dtype],
            DTYPE_CODES[values.dtype],
            code,
            tuple(payload.shape),
            _tensor_bytes(values),
            _tensor_bytes(gaps),
        )
    return Fields(
        KIND_DENSE,
        DTYPE_CODES[payload.dtype],
        DTYPE_CODES[payload.values.dtype],
        0,
        tuple(payload.shape),
        _tensor_bytes(payload.values),
        b"",
    )


def _dtype(code: int, what: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    dt = CODE_DTYPES.get(code)
    if dt is None or dt not in allowed:
        names = ", ".join(f"{DTYPE_CODES[d]}={d}" for d in allowed)
        raise WireError(f"unknown {what} code {code}; expected one of {names}")
    return dt


def _from_bytes(data: bytes | memoryview, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
    itemsize = dtype.itemsize
    if len(data) != count * itemsize:
        raise WireError(f"{what}: expected {count * itemsize} bytes for {count} x {dtype}, got {len(data)}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def from_fields(f: Fields, *, max_numel: int | None = None) -> Payload:
    """Validate `f` and build the payload; `max_numel` bounds the restored tensor's size."""
    if len(f.shape) > MAX_NDIM:
        raise WireError(f"tensor has {len(f.shape)} dimensions; at most {MAX_NDIM} are allowed")
    if any(d < 0 for d in f.shape):
        raise WireError(f"negative dimension in shape {f.shape}")
    numel = numel_of(tuple(f.shape))
    if numel > MAX_NUMEL:
        raise WireError(f"tensor of {numel} elements cannot be addressed by int64 positions")
    if max_numel is not None and numel > max_numel:
        raise WireError(f"tensor of {numel} elements exceeds the limit of {max_numel}")
    dtype = _dtype(f.dtype, "dtype", FLOAT_DTYPES)
    vdtype = _dtype(f.value_dtype, "value dtype", FLOAT_DTYPES)
    vsize = vdtype.itemsize
    if len(f.values) % vsize:
        raise WireError(f"values: {len(f.values)} bytes is not a whole number of {vdtype} items")
    count = len(f.values) // vsize
    values = _from_bytes(f.values, vdtype, count, "values")
    if f.kind == KIND_DENSE:
        if f.index_dtype != 0 or f.indices:
            raise WireError("dense payload must not carry indices")
        if count != numel:
            raise WireError(f"dense payload has {count} values for shape {f.shape} ({numel} elements)")
        return Dense(values, tuple(f.shape), dtype)
    if f.kind != KIND_SPARSE:
        raise WireError(f"unknown payload kind {f.kind}; expected 0 (dense) or 1 (sparse)")
    idtype, gapped = _index_coding(f.index_dtype)
    if count > numel:
        raise WireError(f"sparse payload has {count} values but the tensor has only {numel} elements")
    raw = _from_bytes(f.indices, idtype, count, "indices")
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
    return Sparse(indices, values, tuple(f.shape), dtype)


def _index_coding(code: int) -> tuple[torch.dtype, bool]:
    """(dtype of the index bytes, whether they are gaps) for an index code."""
    if code in CODE_GAPS:
        return CODE_GAPS[code], True
    if CODE_DTYPES.get(code) in (torch.int32, torch.int64):
        return CODE_DTYPES[code], False
    known = sorted([*CODE_GAPS, DTYPE_CODES[torch.int32], DTYPE_CODES[torch.int64]])
    raise WireError(f"unknown index dtype code {code}; expected one of {known}")


def encode(payload: Payload) -> bytes:
    """Bytes of `payload`; `len(encode(p)) == p.nbytes` always."""
    f = to_fields(payload)
    count = len(f.values) // torch.empty((), dtype=CODE_DTYPES[f.value_dtype]).element_size()
    parts = [_HEADER.pack(MAGIC, f.kind, f.dtype, f.value_dtype, f.index_dtype, len(f.shape), count)]
    parts.extend(_DIM.pack(d) for d in f.shape)
    parts.append(f.values)
    parts.append(f.indices)
    return b"".join(parts)


def decode(data: bytes | bytearray | memoryview, *, max_numel: int | None = None) -> Payload:
    """Parse bytes from `encode`; raises `WireError` naming what is wrong."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise WireError(f"payload of {len(view)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, kind, dtype, vdtype, idtype, ndim, count = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}; not a gradcomp payload (expected {MAGIC!r})")
    if kind not in (KIND_DENSE, KIND_SPARSE):
        raise WireError(f"unknown payload kind {kind}; expected 0 (dense) or 1 (sparse)")
    if ndim > MAX_NDIM:
        raise WireError(f"tensor has {ndim} dimensions; at most {MAX_NDIM} are allowed")
    pos = _HEADER.size
    if len(view) < pos + ndim * _DIM.size:
        raise WireError("payload ends inside its shape")
    shape = tuple(_DIM.unpack_from(view, pos + i * _DIM.size)[0] for i in range(ndim))
    pos += ndim * _DIM.size
    vdt = _dtype(vdtype, "value dtype", FLOAT_DTYPES)
    vbytes = count * vdt.itemsize
    ibytes = 0
    if kind == KIND_SPARSE:
        ibytes = count * torch.empty((), dtype=_index_coding(idtype)[0]).element_size()
    if len(view) != pos + vbytes + ibytes:
        raise WireError(f"payload is {len(view)} bytes; its header announces {pos + vbytes + ibytes}")
    fields = Fields(
        kind, dtype, vdtype, idtype, shape, view[pos : pos + vbytes], view[pos + vbytes : pos + vbytes + ibytes]
    )
    return from_fields(fields, max_numel=max_numel)
