"""Forged payloads from a malicious client or a network attacker: the gap decoder and the field validator never yield a
wrong tensor and never fail with anything but `WireError` / `Rejected`.

The attack: gaps whose int64 running sum wraps (e.g. [0, 2**63-1, 2**63-1, 2]) produced positions
such as [0, 2**63-1, -2, 0], which passed the old last-position check; negative positions then
wrapped and a repeated position overwrote a value. The reference below recomputes every
running position with Python's unbounded integers.
"""

from __future__ import annotations

import itertools
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp.compression import Fields, WireError, from_fields
from gradcomp.compression.indices import GAP_CODES, GapError, decode_gaps
from gradcomp.compression.wire import KIND_SPARSE
from gradcomp.protocol.model import model_spec
from gradcomp.server.updates import Rejected, decode_update

INT64_MAX = 2**63 - 1
GAP_RANGES = {torch.uint8: (0, 255), torch.int16: (-(2**15), 2**15 - 1), torch.int32: (-(2**31), 2**31 - 1)}
GAP_RANGES[torch.int64] = (-(2**63), INT64_MAX)


def reference_positions(gaps: list[int], numel: int) -> list[int] | None:
    """The positions the gaps describe, or None when they do not describe ascending in-range positions."""
    if not gaps:
        return []
    if gaps[0] < 0 or any(g < 1 for g in gaps[1:]):
        return None
    positions = list(itertools.accumulate(gaps))
    return positions if positions[-1] < numel else None


def sparse_fields(gaps: torch.Tensor, numel: int) -> Fields:
    values = torch.ones(gaps.numel())
    return Fields(KIND_SPARSE, 1, 1, GAP_CODES[gaps.dtype], (numel,), values.numpy().tobytes(),
                  gaps.numpy().tobytes())  # fmt: skip


def test_the_reported_overflow_stream_is_refused() -> None:
    gaps = torch.tensor([0, INT64_MAX, INT64_MAX, 2], dtype=torch.int64)
    assert torch.cumsum(gaps, 0).tolist() == [0, INT64_MAX, -2, 0]  # the old decoder checked only the 0
    with pytest.raises(WireError, match="overflow|out of range"):
        from_fields(sparse_fields(gaps, 4))


@pytest.mark.parametrize(
    ("gaps", "numel", "problem"),
    [
        ([4], 4, "out of range"),  # first position == numel
        ([1, 9], 8, "out of range"),  # a gap >= numel
        ([2, 0], 8, "repeats"),  # a repeated position
        ([-1, 2], 8, "out of range"),  # a negative first position
        ([INT64_MAX - 1, 2], 2**62, "out of range"),
        ([1, 2**62, 2**62, 2**62], 2**62 + 5, "overflow|out of range"),
    ],
)
def test_each_bad_gap_is_named(gaps: list[int], numel: int, problem: str) -> None:
    with pytest.raises(GapError, match=problem):
        decode_gaps(torch.tensor(gaps, dtype=torch.int64), numel)


@st.composite
def gap_streams(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    dtype = draw(st.sampled_from(list(GAP_RANGES)))
    lo, hi = GAP_RANGES[dtype]
    edge = st.sampled_from([lo, hi, hi - 1, 0, 1, 2, hi // 2 + 1])
    gaps = draw(st.lists(st.integers(lo, hi) | edge, min_size=1, max_size=12))
    numel = draw(st.integers(1, 64) | st.integers(1, INT64_MAX) | st.sampled_from([INT64_MAX, 2**62, 2**32]))
    return torch.tensor(gaps, dtype=dtype), numel


@given(stream=gap_streams())
@settings(max_examples=300, deadline=None)
def test_adversarial_gap_streams_decode_exactly_or_are_refused(stream: tuple[torch.Tensor, int]) -> None:
    gaps, numel = stream
    expected = reference_positions([int(g) for g in gaps.long()], numel)
    try:
        got = decode_gaps(gaps, numel)
    except GapError:
        assert expected is None, f"valid gaps {gaps.tolist()} (numel {numel}) were refused"
        return
    assert expected is not None, f"gaps {gaps.tolist()} (numel {numel}) decoded to {got.tolist()}"
    assert got.tolist() == expected


@given(
    gaps=st.lists(st.integers(1, 3), min_size=1, max_size=40),
    first=st.integers(0, 3),
    numel=st.integers(1, 200),
)
@settings(max_examples=200, deadline=None)
def test_small_honest_looking_streams_match_the_reference(gaps: list[int], first: int, numel: int) -> None:
    stream = torch.tensor([first, *gaps], dtype=torch.uint8)
    expected = reference_positions([first, *gaps], numel)
    if expected is None:
        with pytest.raises(WireError):
            from_fields(sparse_fields(stream, numel))
        return
    dense = from_fields(sparse_fields(stream, numel)).to_dense()
    assert dense.nonzero().flatten().tolist() == expected  # each position written exactly once


CODES = [0, 1, 2, 3, 4, 5, 6, 16, 17, 18, 19, 20]
any_fields = st.builds(
    Fields,
    kind=st.integers(0, 3),
    dtype=st.integers(0, 8),
    value_dtype=st.integers(0, 8),
    index_dtype=st.sampled_from(CODES),
    shape=st.lists(st.integers(0, 20) | st.integers(0, 2**64 - 1), max_size=3).map(tuple),
    values=st.binary(max_size=64),
    indices=st.binary(max_size=64),
    # kinds with parameters (qsgd: u32 levels | u32 bucket | f32 norms) as well as arbitrary bytes
    extra=st.just(b"")
    | st.binary(max_size=48)
    | st.tuples(st.integers(0, 300), st.integers(0, 20), st.binary(max_size=40)).map(
        lambda t: struct.pack("<II", t[0], t[1]) + t[2]
    ),
)
SPEC = model_spec({"w": torch.zeros(3, 4), "b": torch.zeros(4)})


@given(f=any_fields, other=any_fields)
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_fields_raise_only_wire_errors_and_updates_only_rejections(f: Fields, other: Fields) -> None:
    for limit in (None, 12):
        try:
            payload = from_fields(f, max_numel=limit)
        except WireError:
            pass
        else:
            dense = payload.to_dense() if payload.numel <= 4096 else None
            assert dense is None or dense.numel() == payload.numel
    try:
        decode_update({"w": f, "b": other}, SPEC, max_bytes=1000)
    except Rejected as err:
        assert err.reason in {"malformed", "bad_shape", "bad_dtype", "non_finite", "too_large"}
