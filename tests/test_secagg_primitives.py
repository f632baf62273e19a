"""Secure aggregation's building blocks: Shamir sharing, key agreement and AEAD, masks in
Z_(2^b), the neighbourhood graph, the settings' bounds, quantisation and the message encoding."""

from __future__ import annotations

import contextlib
import itertools
import math
import os

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcomp.keyed_random import KeyedStream, new_key
from gradcomp.secagg import crypto, shamir
from gradcomp.secagg.graph import is_connected, neighbourhoods
from gradcomp.secagg.masks import apply, expand
from gradcomp.secagg.messages import (
    Advertise,
    EncryptedShare,
    MaskedInput,
    MaskedInputRequest,
    MessageError,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from gradcomp.secagg.params import SecAggParams, log_degree, settings_for, short_of_threshold
from gradcomp.secagg.quantise import (
    Quantiser,
    WrapError,
    check_no_wrap,
    discrete_gaussian_tail,
    from_ring,
    stochastic_round,
    to_ring,
)


def test_the_field_is_prime_and_holds_every_32_byte_secret() -> None:
    assert sympy.isprime(shamir.PRIME) and shamir.PRIME > 2**256
    assert not any(sympy.isprime(2**256 + c) for c in range(1, 297, 2))  # the smallest such prime


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 7), st.integers(0, 5), st.randoms(use_true_random=False))
def test_any_t_shares_rebuild_the_secret_and_t_minus_1_do_not(secret: bytes, t: int, extra: int, rnd) -> None:
    points = rnd.sample(range(1, 10_000), t + extra)
    shares = shamir.split(secret, t, points)
    for subset in itertools.islice(itertools.combinations(points, t), 10):
        chosen = rnd.sample(list(subset), t)
        assert shamir.combine({x: shares[x] for x in chosen}, t) == secret
    fewer = {x: shares[x] for x in points[: t - 1]}
    with pytest.raises(shamir.ShamirError):
        shamir.combine(fewer, t)
    if t >= 2:  # interpolating t-1 points of a degree t-1 polynomial misses the secret
        with contextlib.suppress(shamir.ShamirError):  # above 2^256: not even a candidate secret
            assert shamir.combine(fewer, t - 1) != secret


def test_one_share_of_a_2_of_2_sharing_does_not_show_the_secret() -> None:
    """With t = 2 a share is secret + r * x for a uniform r: its bytes vary freely even for the zero secret."""
    lows = [shamir.split(bytes(32), 2, [1, 2])[1][-1] for _ in range(2000)]
    assert len(set(lows)) > 200 and np.mean(lows) == pytest.approx(127.5, abs=10)


def test_shamir_refuses_bad_inputs() -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(32), 3, [1, 2])
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(32), 2, [1, 1])
    with pytest.raises(shamir.ShamirError):
        shamir.combine({1: b"\xff" * 33, 2: bytes(33)}, 2)  # not a field element


def test_agreement_is_symmetric_and_bound_to_its_context() -> None:
    a, b = crypto.new_private(), crypto.new_private()
    info = crypto.context("share", b"r", 1, 2)
    assert crypto.agree(a, crypto.public_bytes(b), info) == crypto.agree(b, crypto.public_bytes(a), info)
    others = [
        crypto.context("share", b"r", 2, 1),
        crypto.context("mask", b"r", 1, 2),
        crypto.context("share", b"s", 1, 2),
    ]
    keys = {crypto.agree(a, crypto.public_bytes(b), c) for c in [info, *others]}
    assert len(keys) == 4
    with pytest.raises(ValueError):  # a low-order point (the all-zero key) gives no key
        crypto.agree(a, bytes(32), info)


def test_a_sealed_share_opens_only_under_its_associated_data() -> None:
    key = new_key()
    blob = crypto.seal(key, b"share", b"ad")
    assert crypto.open_sealed(key, blob, b"ad") == b"share"
    for wrong_key, ad in ((key, b"ad2"), (new_key(), b"ad")):
        with pytest.raises(crypto.DecryptError):
            crypto.open_sealed(wrong_key, blob, ad)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(crypto.DecryptError):
        crypto.open_sealed(key, tampered, b"ad")


@pytest.mark.parametrize("bits", [1, 4, 16, 32, 63, 64])
def test_integers_mod_pow2_are_the_low_bits_of_the_keystream(bits: int) -> None:
    key = new_key()
    words = KeyedStream(key).words(1001)
    got = KeyedStream(key).integers_mod_pow2(1001, bits)
    assert got.dtype == np.uint64 and np.array_equal(got, words & np.uint64((1 << bits) - 1) if bits < 64 else words)
    with pytest.raises(ValueError):
        KeyedStream(key).integers_mod_pow2(3, 65)


def test_integers_mod_pow2_are_uniform() -> None:
    counts = np.bincount(KeyedStream(new_key()).integers_mod_pow2(160_000, 4).astype(np.int64), minlength=16)
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 50  # 15 degrees of freedom: p ~ 1e-5


def test_words_keep_the_stream_position_whole_blocks() -> None:
    key = new_key()
    s = KeyedStream(key)
    s.words(3)
    assert s.position == 2
    assert np.array_equal(KeyedStream(key, s.position).words(4), KeyedStream(key).words(8)[4:])


def test_graph_is_k_regular_symmetric_seeded_and_k_connected() -> None:
    ids, seed = list(range(0, 60, 3)), os.urandom(32)
    g = neighbourhoods(ids, 4, seed)
    assert g == neighbourhoods(reversed(ids), 4, seed) and g != neighbourhoods(ids, 4, os.urandom(32))
    assert all(len(nb) == 4 and u not in nb and all(u in g[v] for v in nb) for u, nb in g.items())
    for removed in itertools.combinations(ids[:8], 3):  # any k-1 removed: still connected
        assert is_connected(set(ids) - set(removed), g)
    assert neighbourhoods([1, 2, 3], 4, seed) == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}
    with pytest.raises(ValueError):
        neighbourhoods(range(10), 3, seed)
    assert not is_connected({0, 1}, {0: {2}, 1: {2}, 2: {0, 1}}) and not is_connected(set(), g)


def test_settings_bounds() -> None:
    SecAggParams(degree=4, threshold=3, min_survivors=4)
    for bad in (
        dict(degree=3, threshold=2, min_survivors=3),  # odd degree
        dict(degree=4, threshold=2, min_survivors=3),  # t = k/2: both secrets of one client reachable
        dict(degree=4, threshold=5, min_survivors=6),  # t > k
        dict(degree=4, threshold=3, min_survivors=3),  # a survivor needs t surviving neighbours
        dict(degree=4, threshold=3, min_survivors=4, bits=24),
    ):
        with pytest.raises(ValueError):
            SecAggParams(**bad)
    assert [log_degree(n) for n in (3, 10, 100, 1000)] == [2, 8, 20, 30]
    p = settings_for(100)
    assert (p.degree, p.threshold, p.min_survivors) == (20, 11, 12)
    assert short_of_threshold(20, 11, 0.0) == 0.0 and short_of_threshold(4, 3, 0.5) == pytest.approx(11 / 16)
    for n, dropout in ((100, 0.3), (1000, 0.1), (1000, 0.3)):  # more dropout: a larger degree
        p = settings_for(n, dropout=dropout)
        assert p.degree >= n - 1 or n * short_of_threshold(p.degree, p.threshold, dropout) <= 0.01
        assert p.degree == log_degree(n) or n * short_of_threshold(p.degree - 2, p.degree // 2, dropout) > 0.01
    assert settings_for(1000, dropout=0.3).degree > settings_for(1000, dropout=0.1).degree == 30
    with pytest.raises(ValueError):
        settings_for(100, dropout=0.5)


def test_stochastic_rounding_is_unbiased() -> None:
    z = np.array([0.25, -1.75, 3.5, 7.0, -0.001, 123.999])
    stream, reps = KeyedStream(new_key()), 40_000
    rounded = np.stack([stochastic_round(z, stream) for _ in range(reps)])
    assert set(np.unique(rounded[:, 0])) == {0, 1} and set(np.unique(rounded[:, 3])) == {7}
    se = np.sqrt((z - np.floor(z)) * (1 - (z - np.floor(z))) / reps)
    assert np.all(np.abs(rounded.mean(axis=0) - z) <= 5 * se + 1e-12)


def test_ring_encoding_round_trips_signed_values() -> None:
    q = np.array([0, 1, -1, 2**31 - 1, -(2**31)], dtype=np.int64)
    assert np.array_equal(from_ring(to_ring(q, 32), 32), q)
    assert to_ring(np.array([-1]), 32)[0] == 2**32 - 1
    assert np.array_equal(from_ring(to_ring(q, 64), 64), q)


def test_wrap_check_refuses_settings_whose_sum_could_wrap() -> None:
    assert check_no_wrap(100, clip=1.0, scale=2**20, bits=32) < 2**31
    with pytest.raises(WrapError, match="wraps in 32 bits"):
        check_no_wrap(3000, clip=1.0, scale=2**20, bits=32)
    with pytest.raises(WrapError):  # noise can push it over too
        check_no_wrap(100, clip=1.0, scale=2**20, bits=32, noise_tail=2**25)
    assert check_no_wrap(1, clip=2**31 - 2, scale=1.0, bits=32) == 2**31 - 1  # the largest signed value
    with pytest.raises(WrapError):
        check_no_wrap(1, clip=2**31 - 1, scale=1.0, bits=32)


def test_quantised_sum_decodes_to_the_sum_of_clipped_updates() -> None:
    q, n = Quantiser(clip=1.0, scale=2**16, bits=32), 20
    check_no_wrap(n, q.clip, q.scale, q.bits)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=50) * (3 if i % 2 else 0.01) for i in range(n)]
    total = sum(q.encode(x, KeyedStream(new_key())) for x in xs) & np.uint64(2**32 - 1)
    clipped = sum(x * min(1.0, 1.0 / np.linalg.norm(x)) for x in xs)
    assert np.max(np.abs(q.decode(total) - clipped)) <= n / q.scale
    noise = np.full(50, -5, dtype=np.int64)
    assert np.array_equal(
        from_ring(q.encode(xs[0], KeyedStream(b"k" * 32), noise), 32) + 5, q.integers(xs[0], KeyedStream(b"k" * 32))
    )


def test_messages_round_trip_through_their_bytes() -> None:
    ad = Advertise(7, os.urandom(32), os.urandom(32))
    share = EncryptedShare(7, 9, os.urandom(EncryptedShare.SIZE - 8))
    msgs = [
        ad,
        share,
        ShareKeysRequest(9, (ad, ad)),
        ShareKeysResponse(7, (share,)),
        MaskedInputRequest(9, (share, share)),
        UnmaskRequest(3, (1, 2, 5), (4,)),
        UnmaskResponse(3, {1: os.urandom(33), 2: os.urandom(33)}, {4: os.urandom(33)}),
    ]
    for m in msgs:
        assert type(m).from_bytes(m.to_bytes()) == m
    assert len(ad.to_bytes()) == 68 and len(share.to_bytes()) == 8 + 12 + 66 + 16
    y = np.array([0, 2**32 - 1, 5], dtype=np.uint64)
    back = MaskedInput.from_bytes(MaskedInput(1, 32, y).to_bytes())
    assert np.array_equal(back.y, y) and len(MaskedInput(1, 32, y).to_bytes()) == 9 + 12
    with pytest.raises(MessageError):
        MaskedInput.from_bytes(MaskedInput(1, 32, y).to_bytes()[:-1])
    with pytest.raises(MessageError):
        Advertise.from_bytes(ad.to_bytes() + b"x")
    for m in msgs[2:]:  # truncated anywhere: a MessageError, never struct.error or a short message
        data = m.to_bytes()
        for cut in (1, 5, len(data) - 1):
            with pytest.raises(MessageError):
                type(m).from_bytes(data[:cut])


def test_discrete_gaussian_noise_from_the_keyed_stream_fits_its_tail_bound_and_the_wrap_check() -> None:
    """Distributed DP's place: integer noise between rounding and masking, bounded for the wrap check."""
    n, dim, sigma_sq, beta = 20, 5000, 400, 1e-6
    tail = discrete_gaussian_tail(sigma_sq, dim, n, beta)
    assert tail == pytest.approx(math.sqrt(2 * 400 * math.log(2 * 20 * 5000 / 1e-6)))
    noise = KeyedStream(new_key()).discrete_gaussian(n * dim, sigma_sq)
    assert np.abs(noise).max() <= tail and float(noise.std()) == pytest.approx(20, rel=0.02)
    q = Quantiser(clip=1.0, scale=2**10, bits=32)
    check_no_wrap(n, q.clip, q.scale, q.bits, noise_tail=tail)
    x = np.linspace(-1, 1, dim) / 50
    sums = sum(from_ring(q.encode(x, KeyedStream(new_key()), noise[i * dim : (i + 1) * dim]), 32) for i in range(n))
    plain = sum(q.integers(x, KeyedStream(new_key())) for _ in range(n))
    assert np.std(sums - plain) == pytest.approx(20 * math.sqrt(n), rel=0.05)  # the noises add up


def test_chunked_mask_application_equals_whole_masks() -> None:
    keys, dim = [new_key() for _ in range(4)], (1 << 15) * 2 + 3  # two whole chunks and an odd tail
    x = KeyedStream(new_key()).integers_mod_pow2(dim, 16)
    want = x + expand(keys[0], dim, 16) + expand(keys[1], dim, 16) - expand(keys[2], dim, 16) - expand(keys[3], dim, 16)
    got = apply(x.copy(), keys[:2], keys[2:], 16)
    assert np.array_equal(got, want & np.uint64(0xFFFF)) and int(got.max()) < 2**16


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.sampled_from([8, 16, 32]), st.floats(0.01, 100.0), st.booleans(), st.integers(1, 8))
def test_the_largest_scale_the_wrap_check_allows_never_wraps(
    n: int, bits: int, clip: float, negative: bool, dim: int
) -> None:
    """Worst case for wrapping: every client puts its whole clipped norm on one coordinate, same sign."""
    scale = (2.0 ** (bits - 1) / n - 1) / clip * (1 - 1e-9)  # just inside the bound
    if scale <= 0:  # n alone (each client's rounding slack of 1) reaches 2^(bits-1)
        with pytest.raises(WrapError):
            check_no_wrap(n, clip, 1e-9, bits)
        return
    check_no_wrap(n, clip, scale, bits)
    with pytest.raises(WrapError):
        check_no_wrap(n, clip, scale * (1 + 1e-6) + 2 / clip, bits)
    q = Quantiser(clip, scale, bits)
    x = np.zeros(dim)
    x[0] = (-1 if negative else 1) * clip * 10  # clipped to norm `clip`
    ints = [q.integers(x, KeyedStream(new_key())) for _ in range(n)]
    ring_sum = sum(to_ring(i, bits) for i in ints) & np.uint64((1 << bits) - 1)
    assert np.array_equal(from_ring(ring_sum, bits), sum(ints))  # the modular sum is the true sum
