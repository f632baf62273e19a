"""Tensors and models <-> protobuf, without pickle; the per-version cache of the serialised model.

`Tensor` messages map one-to-one onto `gradcomp.compression.Fields`. A model travels as one
serialised `ModelWeights` cut into chunks of `chunk_bytes`; `ModelCache` serialises each
version once, however many clients pull it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from gradcomp._proto import fed_pb2
from gradcomp.compression import Dense, Fields, from_fields, to_fields
from gradcomp.compression.wire import WireError


def fields_to_pb(f: Fields, out: fed_pb2.Tensor | None = None) -> fed_pb2.Tensor:
    msg = out if out is not None else fed_pb2.Tensor()
    msg.kind, msg.dtype, msg.value_dtype, msg.index_dtype = f.kind, f.dtype, f.value_dtype, f.index_dtype
    msg.shape.extend(f.shape)
    msg.values, msg.indices = f.values, f.indices
    return msg


def pb_to_fields(msg: fed_pb2.Tensor) -> Fields:
    return Fields(
        msg.kind, msg.dtype, msg.value_dtype, msg.index_dtype, tuple(msg.shape), bytes(msg.values), bytes(msg.indices)
    )


def tensor_to_fields(t: torch.Tensor) -> Fields:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return to_fields(Dense(flat, tuple(t.shape), t.dtype))


def fields_to_tensor(f: Fields) -> torch.Tensor:
    return from_fields(f).to_dense()


def named_to_pb(tensors: Mapping[str, torch.Tensor]) -> list[fed_pb2.NamedTensor]:
    out = []
    for name, t in tensors.items():
        nt = fed_pb2.NamedTensor(name=name)
        fields_to_pb(tensor_to_fields(t), nt.tensor)
        out.append(nt)
    return out


def pb_to_named(items: list[fed_pb2.NamedTensor]) -> dict[str, torch.Tensor]:
    out = {}
    for nt in items:
        if nt.name in out:
            raise WireError(f"tensor {nt.name!r} appears twice")
        out[nt.name] = fields_to_tensor(pb_to_fields(nt.tensor))
    return out


def serialize_model(params: Mapping[str, torch.Tensor], version: int) -> bytes:
    msg = fed_pb2.ModelWeights(version=version)
    msg.tensors.extend(named_to_pb(params))
    return msg.SerializeToString()


def deserialize_model(data: bytes) -> tuple[int, dict[str, torch.Tensor]]:
    msg = fed_pb2.ModelWeights()
    msg.ParseFromString(data)
    return int(msg.version), pb_to_named(list(msg.tensors))


class ModelCache:
    """Serialised global model per version (the latest few), built once under a lock."""

    def __init__(self, chunk_bytes: int, keep: int = 2):
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        self._data: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.serialisations = 0

    def get(self, version: int, params: Mapping[str, torch.Tensor] | None = None) -> bytes | None:
        """Bytes of `version`; serialises `params` if given and not cached; None if unknown."""
        with self._lock:
            data = self._data.get(version)
            if data is None and params is not None:
                data = self._data[version] = serialize_model(params, version)
                self.serialisations += 1
                for old in sorted(self._data)[: -self.keep]:
                    del self._data[old]
            return data

    def num_chunks(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.chunk_bytes))

    def chunk(self, data: bytes, index: int) -> bytes:
        return data[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]
