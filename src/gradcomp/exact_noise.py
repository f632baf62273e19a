"""Samplers over a source of uniform random 64-bit words whose law is stated exactly.

`uniform` gives float64 uniforms with full floating-point resolution near 0: a 53-bit-only
uniform never falls below 2^-54, so Box-Muller never returns |z| > 8.65 and, for a noise
multiplier z, outputs beyond clip * (1 - 8.65 z) are impossible under the neighbouring input:
a floor of about Phi(1/z - 8.65) on delta per release (0.91 at z = 0.1). Here the exponent is
drawn geometrically from as many words as it takes (Walker/Downey style), so the smallest
uniform is 2^-1022 and the Gaussian's reach is `GAUSSIAN_REACH` (37.6 standard deviations);
`privacy.sampler_residual_delta` turns that reach into the delta it still costs.

`discrete_laplace` and `discrete_gaussian` are Canonne, Kamath and Steinke 2020 ("The Discrete
Gaussian for Differential Privacy", Algorithms 1-3): every acceptance test compares uniform
random integers with integers, so the samples follow the stated pmf exactly, with no rounding
and no truncated tail. Each step runs vectorised over all pending samples; the loops iterate
only over the (geometrically fewer) samples still pending.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from numbers import Rational

import numpy as np

Words = Callable[[int], np.ndarray]  # `n` -> n independent uniform uint64 words

MIN_EXPONENT = 1022  # a uniform below 2^-1022 (subnormal range) is rejected and redrawn
SMALLEST_UNIFORM = 2.0**-MIN_EXPONENT
GAUSSIAN_REACH = math.sqrt(2 * MIN_EXPONENT * math.log(2))  # largest Box-Muller radius, 37.64
LAPLACE_REACH = MIN_EXPONENT * math.log(2)  # largest |Laplace(0, 1)| draw, 708.4
_INT64_SAFE = 2**62


def uniform(words: Words, n: int) -> np.ndarray:
    """`n` float64 draws on [2^-1022, 1): the uniform real truncated to 53 significant bits.

    One word each, except the 1 in 4096 that start with 12 zero bits: those read further words
    until 53 significant bits follow the leading zeros. P(u < q) = q for every double q >= 2^-1022.
    """
    w = np.asarray(words(n), dtype=np.uint64)
    # floor(log2(w >> 11)) from the exponent field of its (exact) float; all integer ops from there
    log2 = ((w >> np.uint64(11)).astype(np.float64).view(np.int64) >> 52) - 1023
    shift = np.maximum(log2 - 41, 0)  # bits below the 53 significant ones
    scale = ((shift + (1023 - 64)) << 52).view(np.float64)  # 2^(shift - 64)
    out = (w >> shift.astype(np.uint64)).astype(np.float64) * scale
    for i in np.flatnonzero(log2 < 41):  # w < 2^52: fewer than 53 significant bits in this word
        out[i] = _long_uniform(words, int(w[i]))
    return out


def _long_uniform(words: Words, acc: int) -> float:
    """The uniform whose first word `acc` has < 53 significant bits: read on, word by word."""
    nbits = 64
    while True:
        length = acc.bit_length()
        if nbits - length >= MIN_EXPONENT:  # below 2^-1022: redraw from a fresh word
            acc, nbits = int(words(1)[0]), 64
            continue
        if length >= 53:
            return math.ldexp(acc >> (length - 53), length - 53 - nbits)
        acc, nbits = (acc << 64) | int(words(1)[0]), nbits + 64


def rational(x: int | Fraction, what: str) -> Fraction:
    """`x` as an exact positive rational; floats are refused (pass Fraction(x).limit_denominator())."""
    if isinstance(x, bool) or not isinstance(x, Rational):
        raise TypeError(f"{what} must be an int or a fractions.Fraction, got {type(x).__name__}")
    value = Fraction(x)
    if value <= 0:
        raise ValueError(f"{what} must be > 0, got {value}")
    return value


def uniform_below(words: Words, m: int, n: int) -> np.ndarray:
    """`n` uniform integers in [0, m) by rejection: int64 when m <= 2^62, else Python ints (object)."""
    bits = (m - 1).bit_length()
    if bits == 0:
        return np.zeros(n, dtype=np.int64)
    draw = _top_bits(words, bits, n)
    while (redo := np.flatnonzero((draw >= m).astype(bool))).size:
        draw[redo] = _top_bits(words, bits, redo.size)
    return draw


def _top_bits(words: Words, bits: int, n: int) -> np.ndarray:
    """`n` uniform integers of `bits` bits: the top bits of one word, or of several joined (object)."""
    if bits <= 62:
        return (np.asarray(words(n), dtype=np.uint64) >> np.uint64(64 - bits)).astype(np.int64)
    per = -(-bits // 64)
    raw = np.asarray(words(n * per), dtype=np.uint64).reshape(n, per)
    out = raw[:, 0].astype(object)  # Python ints, joined limb by limb in object arrays
    for j in range(1, per):
        out = (out << 64) | raw[:, j].astype(object)
    return out >> (64 * per - bits)


def bernoulli_ratio(words: Words, num: np.ndarray, m: int) -> np.ndarray:
    """Bernoulli(num / m) for 0 <= num <= m, exactly: a uniform integer below m compared with num.

    Past 2^62 the uniform is a real V read 53 bits at a time: V's first bits decide against a float
    of num/m wherever they are clear of its rounding (all but ~2^-47 of draws); the rest compare the
    integers num * 2^53 - v * m exactly and, still undecided, draw further bits (recursively).
    """
    if m <= _INT64_SAFE:
        return (uniform_below(words, m, len(num)) < num).astype(bool)
    v = (np.asarray(words(len(num)), dtype=np.uint64) >> np.uint64(11)).astype(np.float64)  # V in [v, v+1) 2^-53
    x = num.astype(np.float64) * (2.0**53 / float(m))  # num/m 2^53, relative error < 2^-50
    yes, no = v + 1 <= x * (1 - 2.0**-48), v >= x * (1 + 2.0**-48)
    unsure = np.flatnonzero(~(yes | no))
    if unsure.size:
        rest = np.empty(unsure.size, dtype=object)
        rest[:] = [int(num[i]) * 2**53 - int(v[i]) * m for i in unsure]
        inside = np.flatnonzero(((rest > 0) & (rest < m)).astype(bool))
        yes[unsure] = (rest >= m).astype(bool)
        yes[unsure[inside]] = bernoulli_ratio(words, rest[inside], m)
    return yes


def bernoulli_exp_fraction(words: Words, num: np.ndarray, den: int) -> np.ndarray:
    """Bernoulli(exp(-num/den)) for 0 <= num <= den (CKS Algorithm 1, K-th step Bernoulli(gamma/K))."""
    go_on = bernoulli_ratio(words, num, den)
    result = ~go_on  # stopped at K = 1: odd
    active, k = np.flatnonzero(go_on), 2
    while active.size:
        go_on = bernoulli_ratio(words, num[active], den * k)
        result[active[~go_on]] = k % 2 == 1
        active, k = active[go_on], k + 1
    return result


def bernoulli_exp(words: Words, num: np.ndarray, den: int) -> np.ndarray:
    """Bernoulli(exp(-num/den)) for num >= 0: floor(num/den) Bernoulli(exp(-1)) and one for the rest."""
    if den >= _INT64_SAFE:
        num = num.astype(object)
    whole = num // den
    alive = np.ones(len(num), dtype=bool)
    j = 0
    while (idx := np.flatnonzero(alive & (whole > j).astype(bool))).size:
        alive[idx] = bernoulli_exp_fraction(words, np.ones(idx.size, dtype=np.int64), 1)
        j += 1
    idx = np.flatnonzero(alive)
    alive[idx] = bernoulli_exp_fraction(words, (num - whole * den)[idx], den)
    return alive


def _geometric_exp1(words: Words, n: int) -> np.ndarray:
    """Failures before the first 0 of Bernoulli(exp(-1)) trials: P(V = v) = (1 - 1/e) e^-v."""
    v, alive = np.zeros(n, dtype=np.int64), np.arange(n)
    while alive.size:
        hit = bernoulli_exp_fraction(words, np.ones(alive.size, dtype=np.int64), 1)
        v[alive[hit]] += 1
        alive = alive[hit]
    return v


def discrete_laplace(words: Words, n: int, scale: int | Fraction) -> np.ndarray:
    """`n` exact draws with P(x) proportional to exp(-|x| / scale) on the integers (CKS Algorithm 2)."""
    t, s = _num_den(rational(scale, "discrete Laplace scale"))
    pass_rate = 1.02 * t * -math.expm1(-1 / t) / -math.expm1(-1)  # 1 / P(pass exp(-U/t)): sizes batches only
    chunks, filled = [np.zeros(0, dtype=np.int64)], 0
    while filled < n:
        batch = int((n - filled) * pass_rate) + 16
        u = uniform_below(words, t, batch)
        u = u[bernoulli_exp_fraction(words, u, t)]
        y = (u + t * _geometric_exp1(words, u.size)) // s
        negative = (np.asarray(words(y.size), dtype=np.uint64) & np.uint64(1)).astype(bool)
        keep = ~(negative & (y == 0).astype(bool))  # -0 is rejected so that 0 is not drawn twice
        z = np.where(negative, -y, y)[keep][: n - filled]
        chunks.append(z)
        filled += z.size
    return _as_int64(np.concatenate(chunks))


def discrete_gaussian(words: Words, n: int, sigma_sq: int | Fraction) -> np.ndarray:
    """`n` exact draws with P(x) proportional to exp(-x^2 / (2 sigma_sq)) on the integers (CKS Algorithm 3).

    The variance is slightly below sigma_sq (`discrete_gaussian_variance`). A discrete Laplace of
    scale t = floor(sigma) + 1 is accepted with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)),
    whose exponent is the ratio of the integers (|Y| t d - c)^2 and 2 c d t^2 for sigma_sq = c/d.
    """
    c, d = _num_den(rational(sigma_sq, "discrete Gaussian sigma_sq"))
    t = math.isqrt(c // d) + 1
    out, filled = np.empty(n, dtype=np.int64), 0
    while filled < n:
        batch = int((n - filled) * (1.35 if c >= 2 * d else 1.9)) + 16  # accepts >= 67% (54% below 2)
        y = discrete_laplace(words, batch, t)
        big = (int(np.abs(y).max(initial=0)) * t * d + c) ** 2 >= _INT64_SAFE
        gap = np.abs(y.astype(object) if big else y) * (t * d) - c
        z = y[bernoulli_exp(words, gap * gap, 2 * c * d * t * t)][: n - filled]
        out[filled : filled + z.size] = z
        filled += z.size
    return out


def discrete_gaussian_variance(sigma_sq: int | Fraction, terms: int | None = None) -> float:
    """The exact variance sum x^2 e^{-x^2/2s} / sum e^{-x^2/2s} (summed to where the terms vanish)."""
    s = float(rational(sigma_sq, "sigma_sq"))
    top = terms if terms is not None else int(40 * math.sqrt(s)) + 40
    x = np.arange(-top, top + 1, dtype=np.float64)
    w = np.exp(-(x * x) / (2 * s))
    return float((x * x * w).sum() / w.sum())


def _num_den(q: Fraction) -> tuple[int, int]:
    return q.numerator, q.denominator


def _as_int64(values: np.ndarray) -> np.ndarray:
    if values.dtype != object:
        return values.astype(np.int64)
    if values.size and max(abs(int(v)) for v in (values.max(), values.min())) >= 2**63:
        raise OverflowError("a discrete sample does not fit int64: the scale is too large")
    return values.astype(np.int64)
