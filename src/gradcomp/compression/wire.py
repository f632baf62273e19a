"""Payload <-> bytes, without pickle. The same fields map one-to-one onto the protobuf
`Tensor` message of the coordinator protocol (see `to_fields` / `from_fields`).

Layout (little-endian):
  magic "GCP1" | kind u8 | dtype u8 | value dtype u8 | index code u8 (0 when no indices) |
  ndim u8 | count u64 | ndim x u64 dims | count values | indices (sparse only: ascending gaps,
  see indices.py; codes 5/6, absolute int32/int64 positions in any order, are still read)
A kind that sends extra bytes (qsgd: levels, norm scales) uses magic "GCP2", which adds
  u32 extra length | extra bytes
after the dims. `payload.wire_nbytes` is the one count of these sizes.

Decoding checks what every kind shares (magic, sizes, shape, the restored dtype, a known kind)
and hands the rest to the kind's own strict `from_fields`, so bad bytes raise `WireError` and
never yield a wrong tensor.
"""

from __future__ import annotations

import struct

from gradcomp.compression.payload import (
    CODE_DTYPES,
    EXTRA_LEN_BYTES,
    Fields,
    Payload,
    WireError,
    kind_class,
    numel_of,
    wire_dtype,
)

MAGIC = b"GCP1"
MAGIC_EXTRA = b"GCP2"
_HEADER = struct.Struct("<4sBBBBBQ")
_DIM = struct.Struct("<Q")
_EXTRA_LEN = struct.Struct("<I")
assert _EXTRA_LEN.size == EXTRA_LEN_BYTES
MAX_NDIM = 8
MAX_NUMEL = 2**63 - 1
KIND_DENSE, KIND_SPARSE = 0, 1

__all__ = ["KIND_DENSE", "KIND_SPARSE", "Fields", "WireError", "decode", "encode", "from_fields", "to_fields"]


def to_fields(payload: Payload) -> Fields:
    return payload.to_fields()


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
    cls = kind_class(f.kind)
    return cls.from_fields(f, numel, wire_dtype(f.dtype, "dtype", cls.restored_dtypes))


def encode(payload: Payload) -> bytes:
    """Bytes of `payload`; `len(encode(p)) == p.nbytes` always."""
    f = to_fields(payload)
    count = len(f.values) // CODE_DTYPES[f.value_dtype].itemsize
    magic = MAGIC_EXTRA if f.extra else MAGIC
    parts = [_HEADER.pack(magic, f.kind, f.dtype, f.value_dtype, f.index_dtype, len(f.shape), count)]
    parts.extend(_DIM.pack(d) for d in f.shape)
    if f.extra:
        parts += [_EXTRA_LEN.pack(len(f.extra)), f.extra]
    parts.append(f.values)
    parts.append(f.indices)
    return b"".join(parts)


def decode(data: bytes | bytearray | memoryview, *, max_numel: int | None = None) -> Payload:
    """Parse bytes from `encode`; raises `WireError` naming what is wrong."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise WireError(f"payload of {len(view)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, kind, dtype, vdtype, idtype, ndim, count = _HEADER.unpack_from(view, 0)
    if magic not in (MAGIC, MAGIC_EXTRA):
        raise WireError(f"bad magic {bytes(magic)!r}; not a gradcomp payload (expected {MAGIC!r} or {MAGIC_EXTRA!r})")
    cls = kind_class(kind)
    if ndim > MAX_NDIM:
        raise WireError(f"tensor has {ndim} dimensions; at most {MAX_NDIM} are allowed")
    pos = _HEADER.size
    if len(view) < pos + ndim * _DIM.size:
        raise WireError("payload ends inside its shape")
    shape = tuple(_DIM.unpack_from(view, pos + i * _DIM.size)[0] for i in range(ndim))
    pos += ndim * _DIM.size
    extra = view[pos:pos]
    if magic == MAGIC_EXTRA:
        if len(view) < pos + _EXTRA_LEN.size:
            raise WireError("payload ends inside its extra length")
        (elen,) = _EXTRA_LEN.unpack_from(view, pos)
        pos += _EXTRA_LEN.size
        if elen == 0 or len(view) < pos + elen:
            raise WireError(f"extra length {elen} must be positive and within the payload's {len(view)} bytes")
        extra, pos = view[pos : pos + elen], pos + elen
    vdt = CODE_DTYPES.get(vdtype)
    if vdt is None:
        raise WireError(f"unknown value dtype code {vdtype}; expected one of {sorted(CODE_DTYPES)}")
    vbytes = count * vdt.itemsize
    ibytes = cls.index_nbytes(count, idtype)
    if len(view) != pos + vbytes + ibytes:
        raise WireError(f"payload is {len(view)} bytes; its header announces {pos + vbytes + ibytes}")
    values, indices = view[pos : pos + vbytes], view[pos + vbytes : pos + vbytes + ibytes]
    fields = Fields(kind, dtype, vdtype, idtype, shape, values, indices, extra)  # type: ignore[arg-type]  # views: no copy
    return from_fields(fields, max_numel=max_numel)
