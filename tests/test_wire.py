"""Payload <-> bytes: exact round trips, exact sizes, and clear errors on bad bytes."""

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp.compression import Fields, Sparse, WireError, build, decode, encode, from_fields, to_fields

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
    # header, one dim, then per kept value: an int16 gap (1% density: gaps ~100) + an fp32 value
    assert sparse.nbytes == 17 + 8 + 1000 * (2 + 4) == len(encode(sparse))
    assert dense.nbytes == 17 + 8 + 100_000 * 4
    assert sparse.nbytes * 60 < dense.nbytes


@pytest.mark.parametrize(
    "positions,width", [([0, 5, 200, 455], 1), ([3, 300, 30_000], 2), ([0, 70_000], 4), ([2**31 + 5], 8)]
)
def test_gaps_use_the_narrowest_width_that_fits(positions: list[int], width: int) -> None:
    numel = max(positions) + 1
    payload = Sparse(torch.tensor(positions), torch.ones(len(positions)), (numel,), torch.float32)
    assert payload.nbytes == 17 + 8 + len(positions) * (4 + width)
    fields = to_fields(payload)
    assert len(fields.indices) == len(positions) * width
    assert from_fields(fields).indices.tolist() == positions


@given(st.sets(st.integers(0, 9_999), max_size=300), st.integers(0, 2**16))
@settings(max_examples=100, deadline=None)
def test_any_index_set_in_any_order_round_trips(positions: set[int], seed: int) -> None:
    order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))
    idx = torch.tensor(sorted(positions), dtype=torch.long)[order]
    values = torch.randn(len(positions), generator=torch.Generator().manual_seed(seed))
    payload = Sparse(idx.to(torch.int32), values, (100, 100), torch.float32)
    back = decode(encode(payload))
    assert len(encode(payload)) == payload.nbytes
    assert torch.equal(back.to_dense(), payload.to_dense())
    assert torch.all(back.indices[1:] > back.indices[:-1]), "the wire carries ascending positions"


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


def _sparse_fields(index_code: int, index_bytes: bytes, count: int, numel: int = 16) -> Fields:
    return Fields(1, 1, 1, index_code, (numel,), bytes(4 * count), index_bytes)


@pytest.mark.parametrize("fields,fragment", [
    (_sparse_fields(16, bytes([3, 1, 12]), 3), "out of range"),  # gaps 3,1,12 -> 3,4,16 (numel 16)
    (_sparse_fields(16, bytes([3, 0, 1]), 3), "repeats an index"),  # a zero gap
    (_sparse_fields(17, struct.pack("<hh", -2, 1), 2), "out of range"),  # negative first position
    (_sparse_fields(17, struct.pack("<hh", 4, -1), 2), "repeats an index"),  # descending
    (_sparse_fields(5, struct.pack("<ii", 1, 16), 2), "out of range"),  # absolute int32 positions
    (_sparse_fields(5, struct.pack("<ii", 7, 7), 2), "repeats an index"),
    (_sparse_fields(9, bytes(2), 2), "unknown index dtype code 9"),
])  # fmt: skip
def test_bad_positions_are_refused(fields: Fields, fragment: str) -> None:
    with pytest.raises(WireError, match=fragment):
        from_fields(fields)


def test_absolute_positions_in_any_order_are_still_read() -> None:
    payload = from_fields(_sparse_fields(5, struct.pack("<iii", 9, 2, 5), 3))
    assert payload.indices.tolist() == [9, 2, 5]


def test_size_limit_is_enforced_before_allocating() -> None:
    data = encode(build("topk(0.01)").compress(torch.randn(10_000)))
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(data, max_numel=1000)


def test_int64_indices_when_positions_do_not_fit_int32() -> None:
    from gradcomp.compression.payload import index_dtype_for

    assert index_dtype_for(2**31 - 1) == torch.int32
    assert index_dtype_for(2**31) == torch.int64
