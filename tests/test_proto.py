"""The committed stubs are what the .proto files generate; Tensor <-> Fields is lossless."""

from __future__ import annotations

import re

import pytest
import torch

from gradcomp._proto import fed_pb2
from gradcomp._proto.generate import PACKAGE_DIR, generate
from gradcomp.compression import build, from_fields, to_fields
from gradcomp.protocol.codec import deserialize_model, fields_to_pb, pb_to_fields, serialize_model
from gradcomp.server.model_cache import ModelCache

# Only the generator's version stamps may differ between grpcio-tools releases.
_STAMP = re.compile(r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,)$")


def _strip(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not _STAMP.match(ln)]


def test_committed_stubs_match_proto() -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate()
    assert fresh, "no stubs generated"
    committed = {p.name for p in PACKAGE_DIR.glob("*_pb2*.py*")}
    assert committed == set(fresh), f"stub files differ: run `make proto` ({sorted(committed ^ set(fresh))})"
    for name, text in fresh.items():
        assert _strip((PACKAGE_DIR / name).read_text()) == _strip(text), f"{name} is stale: run `make proto`"


def test_generated_imports_are_package_relative() -> None:
    for path in PACKAGE_DIR.glob("*_pb2*.py"):
        assert "from gradcomp.v1 import" not in path.read_text(), path.name


@pytest.mark.parametrize("spec", ["none", "topk(ratio=0.1)", "rtopk(ratio=0.05, r=0.2) | fp16", "randomk(ratio=0.3)"])
def test_tensor_message_round_trip(spec: str) -> None:
    pipe = build(spec, seed=1)
    x = torch.randn(7, 11)
    payload = pipe.compress(x, key="w")
    msg = fed_pb2.Tensor()
    msg.ParseFromString(fields_to_pb(to_fields(payload)).SerializeToString())
    back = from_fields(pb_to_fields(msg))
    torch.testing.assert_close(back.to_dense(), payload.to_dense())


def test_model_cache_serialises_each_version_once_and_chunks() -> None:
    params = {"a": torch.randn(300, 100), "b": torch.randn(10)}
    cache = ModelCache(chunk_bytes=4096)
    data = cache.get(3, params)
    assert data is not None
    for _ in range(5):
        assert cache.get(3, params) is data
    assert cache.serialisations == 1
    n = cache.num_chunks(len(data))
    assert n > 1
    joined = b"".join(cache.chunk(data, i) for i in range(n))
    version, back = deserialize_model(joined)
    assert version == 3
    torch.testing.assert_close(back["a"], params["a"])
    assert serialize_model(params, 3) == data
