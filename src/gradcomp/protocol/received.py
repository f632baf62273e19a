"""A global model from the coordinator, checked against the client's own task model.

The coordinator declares every tensor's name, kind, dtype and shape. Decoded on trust, that let
a hostile or impersonated coordinator make a client allocate whatever it declared (a sparse
tensor of shape [2**40] without values asked for 4 TB), crash on a name or shape the task's
model lacks, or leave a tensor out so the client trained it from its own random initialisation.
`decode_global` compares the bytes with the `ModelSpec` of the client's task model before
anything is allocated from a declared shape: the size first, then the names (none missing, none
extra, none twice), then per tensor: dense, the task's dtype on the wire and restored, the
task's shape; and last, finite values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError
from torch import nn

from gradcomp._proto import fed_pb2
from gradcomp.compression import WireError, from_fields
from gradcomp.compression.payload import DTYPE_CODES
from gradcomp.compression.wire import KIND_DENSE
from gradcomp.errors import GradcompError
from gradcomp.protocol.codec import pb_to_fields, serialize_model
from gradcomp.protocol.model import TensorSpec, model_params, model_spec

Params = dict[str, torch.Tensor]
MAX_VERSION = 2**64 - 1  # the longest version varint: the bound holds for every version


class ModelMismatch(GradcompError, ValueError):
    """Received model bytes that are not a model of the client's task."""


@dataclass(frozen=True)
class ModelSpec:
    """The federated tensors of a task's model, and the most bytes a serialised copy of it takes."""

    tensors: dict[str, TensorSpec]  # state-dict order: the order of the tensors in an update
    max_bytes: int  # serialised ModelWeights of this model at any version (the coordinator's exact size)

    @classmethod
    def of(cls, model: nn.Module, extras: Mapping[str, str] | None = None) -> ModelSpec:
        """The model's tensors, and `extras` served beside them (extra name -> the model tensor whose
        shape and dtype it has: a strategy's, e.g. SCAFFOLD's control variate)."""
        params = model_params(model)
        params.update({extra: params[src] for extra, src in (extras or {}).items()})
        return cls(model_spec(params), len(serialize_model(params, MAX_VERSION)))


def decode_global(data: bytes, spec: ModelSpec) -> tuple[int, Params]:
    """(version, tensors in `spec` order) of serialised `ModelWeights` that match `spec`; else `ModelMismatch`."""
    if len(data) > spec.max_bytes:
        raise ModelMismatch(f"model is {len(data)} bytes; the task's model takes at most {spec.max_bytes}")
    msg = fed_pb2.ModelWeights()
    try:
        msg.ParseFromString(data)
    except DecodeError as err:
        raise ModelMismatch(f"model bytes do not parse as ModelWeights: {err}") from None
    by_name = _match_names(msg.tensors, spec)
    return int(msg.version), {name: _tensor(name, by_name[name], want) for name, want in spec.tensors.items()}


def _match_names(items: Sequence[fed_pb2.NamedTensor], spec: ModelSpec) -> dict[str, fed_pb2.Tensor]:
    by_name: dict[str, fed_pb2.Tensor] = {}
    for item in items:
        if item.name in by_name:
            raise ModelMismatch(f"tensor {item.name!r} appears twice in the model")
        by_name[item.name] = item.tensor
    extra = [name for name in by_name if name not in spec.tensors]
    missing = [name for name in spec.tensors if name not in by_name]
    if extra or missing:
        raise ModelMismatch(
            f"model tensors differ from the task's model: missing {missing}, not in the task's model {extra[:8]}"
            + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
        )
    return by_name


def _tensor(name: str, msg: fed_pb2.Tensor, want: TensorSpec) -> torch.Tensor:
    """The dense tensor `msg` holds, checked against `want` before its declared shape is trusted."""
    where = f"tensor {name!r}"
    if msg.kind != KIND_DENSE:
        raise ModelMismatch(f"{where} has payload kind {msg.kind}; a global model is dense (kind {KIND_DENSE})")
    if tuple(msg.shape) != want.shape:
        raise ModelMismatch(f"{where} has shape {list(msg.shape)}; the task's model has {list(want.shape)}")
    code = DTYPE_CODES[want.dtype]
    if msg.dtype != code or msg.value_dtype != code:
        raise ModelMismatch(
            f"{where} has dtype code {msg.dtype} (values {msg.value_dtype}); the task's model has {want.dtype} "
            f"(code {code})"
        )
    try:
        tensor = from_fields(pb_to_fields(msg), max_numel=want.numel).to_dense()
    except WireError as err:
        raise ModelMismatch(f"{where}: {err}") from None
    if not bool(torch.isfinite(tensor).all()):
        raise ModelMismatch(f"{where} holds NaN or infinite values")
    return tensor
