"""Tensors and models <-> protobuf, without pickle.

`Tensor` messages map one-to-one onto `gradcomp.compression.Fields`. A model travels as one
serialised `ModelWeights` (the coordinator cuts it into chunks, see `server/model_cache.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradcomp._proto import fed_pb2
from gradcomp.compression import Dense, Fields, WireError, from_fields


def fields_to_pb(f: Fields, out: fed_pb2.Tensor | None = None) -> fed_pb2.Tensor:
    msg = out if out is not None else fed_pb2.Tensor()
    msg.kind, msg.dtype, msg.value_dtype, msg.index_dtype = f.kind, f.dtype, f.value_dtype, f.index_dtype
    msg.shape.extend(f.shape)
    msg.values, msg.indices, msg.extra = f.values, f.indices, f.extra
    return msg


def pb_to_fields(msg: fed_pb2.Tensor) -> Fields:
    return Fields(
        msg.kind,
        msg.dtype,
        msg.value_dtype,
        msg.index_dtype,
        tuple(msg.shape),
        bytes(msg.values),
        bytes(msg.indices),
        bytes(msg.extra),
    )


def tensor_to_fields(t: torch.Tensor) -> Fields:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return Dense(flat, tuple(t.shape), t.dtype).to_fields()


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
