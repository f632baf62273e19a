"""Payloads: what a compression pipeline sends. `Dense` or `Sparse`, both flat on the wire.

`dtype` is the dtype of the tensor that decompression restores; `values` may be in a
narrower wire dtype (fp16/bf16 stages). `nbytes` is the exact encoded size (see wire.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Stable wire codes; never renumber (they are part of the protocol).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int32: 5,
    torch.int64: 6,
}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT32_MAX = 2**31 - 1

# Header: magic, kind, dtype, value dtype, index dtype, ndim, count (see wire.py).
HEADER_BYTES = 4 + 5 + 8
DIM_BYTES = 8


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices whenever every position fits, int64 otherwise."""
    return torch.int32 if numel <= INT32_MAX else torch.int64


class _Sized:
    """What both payload kinds share: the restored tensor's size and the exact wire size."""

    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact size of this payload on the wire, header included."""
        return HEADER_BYTES + DIM_BYTES * len(self.shape) + self.values.numel() * self._bytes_per_value()

    def _bytes_per_value(self) -> int:
        return self.values.element_size()


@dataclass(frozen=True, eq=False)
class Dense(_Sized):
    """All values, flattened. `values` is 1-D; `shape`/`dtype` describe the restored tensor."""

    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_dense(self) -> torch.Tensor:
        return self.values.to(self.dtype).reshape(self.shape)


@dataclass(frozen=True, eq=False)
class Sparse(_Sized):
    """Selected positions (flat, unique) and their values; every other entry is zero."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    def _bytes_per_value(self) -> int:
        from gradcomp.compression.indices import gap_width

        return self.values.element_size() + gap_width(self.indices)

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.values.device)
        out[self.indices.long()] = self.values.to(self.dtype)
        return out.reshape(self.shape)


Payload = Dense | Sparse


def dense_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """What an uncompressed payload of this tensor costs on the wire (the baseline)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return HEADER_BYTES + DIM_BYTES * len(shape) + numel_of(shape) * itemsize
