"""Payload <-> bytes: exact round trips, exact sizes, and clear errors on bad bytes."""

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp.compression import WireError, build, decode, encode, from_fields, to_fields

SPECS = [
    "none",
    "topk(0.1)",
    "randomk(0.2, seed=1)",
    "rtopk(ratio=0.1, r=0.3)",
    "unit(scale=2.0)",
    "dp(clip=1.0, sigma=0.5)",
    "fp16",
    "bf16",
    "topk(0.1) | ef",
    "randomk(0.2) | dp(clip=1.0, sigma=1.0) | ef",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


@given(spec=st.sampled_from(SPECS), dtype=st.sampled_from(DTYPES), shape=shapes, seed=st.integers(0, 1000))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_is_exact_for_every_stage_dtype_and_shape(spec, dtype, shape, seed) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    pipe = build(spec, seed=seed)
    payload = pipe.compress(x, "k")
    data = encode(payload)
    assert len(data) == payload.nbytes
    back = decode(data)
    assert type(back) is type(payload)
    assert torch.equal(pipe.decompress(back), pipe.decompress(payload))
    assert pipe.decompress(back).shape == x.shape and pipe.decompress(back).dtype == dtype
    assert torch.equal(pipe.decompress(from_fields(to_fields(payload))), pipe.decompress(payload))


def test_sparse_payload_costs_what_it_carries() -> None:
    x = torch.randn(100_000)
    sparse = build("topk(0.01)").compress(x)
    dense = build("none").compress(x)
    assert sparse.nbytes == 17 + 8 + 1000 * (4 + 4)  # header, one dim, int32 index + fp32 value
    assert dense.nbytes == 17 + 8 + 100_000 * 4
    assert sparse.nbytes * 40 < dense.nbytes


@given(data=st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_garbage_bytes_raise_wire_error(data: bytes) -> None:
    try:
        payload = decode(data)
    except WireError:
        return
    # the rare valid parse must describe a consistent payload
    assert payload.nbytes == len(data)


def _valid() -> bytes:
    return encode(build("topk(0.25)").compress(torch.randn(4, 4), "k"))


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda b: b[:10], "shorter than"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:-1], "header announces"),
        (lambda b: b + b"\0", "header announces"),
        (lambda b: b[:5] + bytes([99]) + b[6:], "unknown dtype code 99"),
        (lambda b: b[:6] + bytes([5]) + b[7:], "unknown value dtype code 5"),
        (lambda b: b[:4] + bytes([7]) + b[5:], "unknown payload kind 7"),
        (lambda b: b[:8] + bytes([9]) + b[9:], "dimensions"),
    ],
)
def test_malformed_bytes_name_the_problem(mutate, fragment: str) -> None:
    with pytest.raises(WireError, match=fragment):
        decode(mutate(_valid()))


def test_out_of_range_and_repeated_indices_are_refused() -> None:
    payload = build("topk(0.25)").compress(torch.randn(16), "k")
    data = bytearray(encode(payload))
    tail = len(data) - 4 * 4  # last four int32 indices
    data[tail : tail + 4] = struct.pack("<i", 16)
    with pytest.raises(WireError, match="out of range"):
        decode(bytes(data))
    data[tail : tail + 4] = data[tail + 4 : tail + 8]
    with pytest.raises(WireError, match="repeats an index"):
        decode(bytes(data))


def test_size_limit_is_enforced_before_allocating() -> None:
    data = encode(build("topk(0.01)").compress(torch.randn(10_000)))
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(data, max_numel=1000)


def test_int64_indices_when_positions_do_not_fit_int32() -> None:
    from gradcomp.compression.payload import index_dtype_for

    assert index_dtype_for(2**31 - 1) == torch.int32
    assert index_dtype_for(2**31) == torch.int64
