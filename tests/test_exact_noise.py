"""The samplers' reach and laws: full-resolution uniforms, exact discrete Laplace and Gaussian."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from gradcomp import exact_noise
from gradcomp.keyed_random import KeyedStream

KEY = bytes(range(32))


class CraftedStream(KeyedStream):
    """A KeyedStream whose words are given, so that a test can feed it the extreme ones."""

    def __init__(self, words: list[int]):
        super().__init__(KEY)
        self._crafted = list(words)

    def words(self, n: int) -> np.ndarray:
        taken, self._crafted = self._crafted[:n], self._crafted[n:]
        return np.array(taken, dtype=np.uint64)


def test_the_smallest_uniform_is_2_to_the_minus_1022_and_fixes_the_gaussian_reach() -> None:
    # 1021 zero bits, then a one: the smallest uniform the sampler can return
    smallest = [0] * 15 + [1 << (64 - (1022 - 15 * 64))] + [0]
    assert exact_noise.uniform(CraftedStream(smallest).words, 1)[0] == 2.0**-1022 == exact_noise.SMALLEST_UNIFORM
    # 1024 zero bits: below 2^-1022, rejected and redrawn from the next word
    assert exact_noise.uniform(CraftedStream([0] * 16 + [1 << 63]).words, 1)[0] == 0.5
    # Box-Muller at that radius with angle pi: the largest |z| there is
    z = CraftedStream([*smallest, 1 << 63]).normal((2,), torch.float64, "cpu")
    assert float(z[0]) == pytest.approx(-exact_noise.GAUSSIAN_REACH, rel=1e-12)
    assert pytest.approx(math.sqrt(-2 * math.log(2.0**-1022))) == exact_noise.GAUSSIAN_REACH
    assert 37.6 < exact_noise.GAUSSIAN_REACH < 37.7
    lap = CraftedStream([*smallest, 0, 0]).laplace((1,), torch.float64, "cpu")
    assert float(lap[0]) == pytest.approx(exact_noise.LAPLACE_REACH) == pytest.approx(1022 * math.log(2))


def test_uniforms_are_the_real_uniform_truncated_to_53_significant_bits() -> None:
    w2 = 0x0123456789ABCDEF
    words = [1 << 63, 2**64 - 1, 1, 5 << 52, w2]  # the third reads on into w2
    u = exact_noise.uniform(CraftedStream(words).words, 4)
    acc = (1 << 64) | w2  # 63 zero bits then a one: read on into the next word
    assert u[0] == 0.5 and u[1] == 1 - 2.0**-53
    assert u[2] == math.ldexp(acc >> (acc.bit_length() - 53), acc.bit_length() - 53 - 128)
    assert u[3] == 5 * 2.0**-12
    assert 2.0**-64 <= u[2] < 2.0**-63


def test_uniforms_below_2_to_the_minus_54_occur_at_their_rate() -> None:
    u = KeyedStream(KEY).uniform(1 << 20)
    assert u.min() > 0 and u.max() < 1
    # the old sampler's floor was 2^-54; about 2^20 * 2^-12 of these lie below 2^-12 and a few far below
    assert abs(int((u < 2.0**-12).sum()) - 256) < 5 * 16
    assert u.min() < 2.0**-14
    for q in (0.5, 0.1, 2.0**-8):
        assert abs(float((u < q).mean()) - q) < 5 * math.sqrt(q / (1 << 20))


def _chi_square(draws: np.ndarray, log_pmf, support: int) -> tuple[float, float]:
    """Chi-square of the counts on [-support, support] (tails pooled) and its 1e-4 critical value."""
    xs = np.arange(-support, support + 1)
    p = np.exp([log_pmf(int(x)) for x in xs])
    tail = max(0.0, 1.0 - p.sum())
    counts = np.array([(draws == x).sum() for x in xs] + [(np.abs(draws) > support).sum()], dtype=float)
    expected = len(draws) * np.append(p, tail)
    keep = expected > 5
    stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    df = int(keep.sum()) - 1
    return stat, df * (1 - 2 / (9 * df) + 3.72 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty


def _log_normaliser(weight, top: int) -> float:
    return math.log(math.fsum(math.exp(weight(x)) for x in range(-top, top + 1)))


@pytest.mark.parametrize("sigma_sq", [Fraction(1, 3), 2, Fraction(37, 4)])
def test_discrete_gaussian_matches_its_exact_pmf(sigma_sq: int | Fraction) -> None:
    draws = KeyedStream(KEY).discrete_gaussian(200_000, sigma_sq)
    assert draws.dtype == np.int64 and draws.shape == (200_000,)
    s = float(sigma_sq)
    weight = lambda x: -x * x / (2 * s)  # noqa: E731
    log_z = _log_normaliser(weight, int(40 * math.sqrt(s)) + 40)
    stat, critical = _chi_square(draws, lambda x: weight(x) - log_z, int(4 * math.sqrt(s)) + 2)
    assert stat < critical
    exact_var = exact_noise.discrete_gaussian_variance(sigma_sq)
    second = float((draws.astype(float) ** 2).mean())
    se = float((draws.astype(float) ** 2).std()) / math.sqrt(len(draws))
    assert abs(second - exact_var) < 4 * se and abs(float(draws.mean())) < 4 * math.sqrt(s / len(draws))


def test_discrete_gaussian_variance_is_below_sigma_sq_as_the_series_says() -> None:
    # at sigma^2 = 1/3 the series gives 0.3212, and 200k draws tell it from 1/3
    exact = exact_noise.discrete_gaussian_variance(Fraction(1, 3))
    assert exact == pytest.approx(0.32119, abs=1e-4)
    draws = KeyedStream(KEY).discrete_gaussian(200_000, Fraction(1, 3)).astype(float)
    se = float((draws**2).std()) / math.sqrt(len(draws))
    assert abs(float((draws**2).mean()) - exact) < 4 * se < 1 / 3 - exact
    assert exact_noise.discrete_gaussian_variance(100) == pytest.approx(100, rel=1e-12)


@pytest.mark.parametrize("scale", [1, Fraction(3, 2), 7])
def test_discrete_laplace_matches_its_exact_pmf(scale: int | Fraction) -> None:
    draws = KeyedStream(KEY).discrete_laplace(200_000, scale)
    b = float(scale)
    log_z = math.log((1 + math.exp(-1 / b)) / (1 - math.exp(-1 / b)))
    stat, critical = _chi_square(draws, lambda x: -abs(x) / b - log_z, int(6 * b) + 2)
    assert stat < critical


def test_large_parameters_take_the_python_integer_path_and_keep_their_law() -> None:
    sigma_sq = 10**12 + 1  # gaps^2 and denominators beyond 2^62
    draws = KeyedStream(KEY).discrete_gaussian(20_000, sigma_sq).astype(float)
    assert float(draws.var()) == pytest.approx(sigma_sq, rel=0.05) and abs(float(draws.mean())) < 4e6 / math.sqrt(20)
    fine = KeyedStream(KEY).discrete_gaussian(20_000, Fraction(10**6, 3**40)).astype(float)  # denominator > 2^63
    assert float(fine.var()) == pytest.approx(exact_noise.discrete_gaussian_variance(Fraction(10**6, 3**40)), rel=0.3)


def test_exact_bernoulli_exp_rates() -> None:
    stream = KeyedStream(KEY)
    for num, den in [(3, 2), (1, 1), (0, 5), (7, 3), (2**70 + 1, 2**70)]:
        hits = exact_noise.bernoulli_exp(stream.words, np.full(100_000, num, dtype=object), den)
        p = math.exp(-num / den)
        assert abs(float(hits.mean()) - p) <= 5 * math.sqrt(p * (1 - p) / 100_000) + 1e-12


def test_discrete_draws_are_determined_by_key_and_position() -> None:
    a = KeyedStream(KEY)
    first, second = a.discrete_gaussian(1000, 50), a.discrete_gaussian(300, Fraction(9, 7))
    b = KeyedStream(KEY)
    assert np.array_equal(b.discrete_gaussian(1000, 50), first)
    assert np.array_equal(KeyedStream(KEY, b.position).discrete_gaussian(300, Fraction(9, 7)), second)
    assert not np.array_equal(KeyedStream(bytes(32)).discrete_gaussian(1000, 50), first)


def test_parameters_must_be_exact_and_positive() -> None:
    stream = KeyedStream(KEY)
    with pytest.raises(TypeError, match="Fraction"):
        stream.discrete_gaussian(3, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="> 0"):
        stream.discrete_gaussian(3, 0)
    with pytest.raises(TypeError):
        stream.discrete_laplace(3, True)  # type: ignore[arg-type]
    assert stream.discrete_gaussian(0, 4).shape == (0,)


def test_a_bernoulli_ratio_past_2_to_the_62_is_decided_exactly_at_its_boundary() -> None:
    m, half = 2**70, np.array([2**69], dtype=object)

    def ratio(words: list[int], num: np.ndarray) -> bool:
        return bool(exact_noise.bernoulli_ratio(CraftedStream(words).words, num, m)[0])

    # V's first 53 bits say exactly 1/2 or just below it: the float test cannot tell, the integers do
    assert ratio([1 << 63], half) is False  # V >= 1/2 = p
    assert ratio([(1 << 63) - (1 << 11)], half) is True  # V < 1/2 = p
    # p = 1/2 + 2^-70 and V's first bits exactly 1/2: decided by the next word
    above = np.array([2**69 + 1], dtype=object)
    assert ratio([1 << 63, 0], above) is True and ratio([1 << 63, 2**64 - 1], above) is False
