"""From a float update to an element of Z_(2^b) whose sum over n clients cannot wrap.

1. Clip the whole update to L2 norm C (the same whole-update clip as central and local DP).
2. Scale by gamma.
3. Round each coordinate stochastically: up with probability equal to its fractional part, so the
   rounded value's expectation is the scaled value (to within 2^-53).
4. (Distributed DP adds integer noise here, between rounding and masking.)
5. Map to Z_(2^b) in two's complement; the coordinator maps the unmasked sum back the same way.

Why the sum cannot wrap: after clipping, every coordinate satisfies |gamma x_j| <= C gamma, and
rounding moves it by less than 1, so each client's coordinate lies in [-(C gamma + 1), C gamma + 1]
plus its noise, and the sum of n clients in n times that. `check_no_wrap` refuses settings where
n (C gamma + 1 + noise_tail) >= 2^(b-1), the largest magnitude two's complement holds. The noise
tail is the caller's bound on one client's noise per coordinate; for unbounded noise (discrete
Gaussian) it is a high-probability bound, and the caller must say at what probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradcomp.errors import GradcompError
from gradcomp.keyed_random import KeyedStream
from gradcomp.secagg.masks import reduce


class WrapError(GradcompError, ValueError):
    """Settings under which the modular sum could wrap around."""


def check_no_wrap(n: int, clip: float, scale: float, bits: int, noise_tail: float = 0.0) -> float:
    """The largest |coordinate| the sum of `n` clients can reach; raises `WrapError` when it does
    not fit in Z_(2^bits) as a signed value."""
    if n < 1 or clip <= 0 or scale <= 0 or noise_tail < 0:
        raise WrapError("n must be positive, clip and scale above 0, noise_tail at least 0")
    bound = n * (clip * scale + 1.0 + noise_tail)
    if not bound < 2.0 ** (bits - 1):
        raise WrapError(
            f"the sum of {n} clients can reach {bound:.4g} per coordinate, which wraps in {bits} bits "
            f"(limit 2^{bits - 1} = {2.0 ** (bits - 1):.4g}): lower clip * scale ({clip * scale:g}), "
            "fewer clients per round, or more bits"
        )
    return bound


def discrete_gaussian_tail(sigma_sq: float, dim: int, n: int, beta: float) -> float:
    """A bound on |noise| per coordinate that holds for all n clients' `dim` discrete-Gaussian draws
    (variance parameter sigma_sq) at once, except with probability at most `beta`: the discrete
    Gaussian is sub-Gaussian (Canonne, Kamath, Steinke 2020: P(X >= t) <= exp(-t^2 / (2 sigma_sq))),
    and a union bound over the 2 n dim one-sided tails gives sqrt(2 sigma_sq ln(2 n dim / beta))."""
    if sigma_sq <= 0 or dim < 1 or n < 1 or not 0 < beta < 1:
        raise ValueError("sigma_sq must be above 0, dim and n at least 1, beta in (0, 1)")
    return math.sqrt(2.0 * sigma_sq * math.log(2.0 * n * dim / beta))


def clip_l2(x: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


def stochastic_round(z: np.ndarray, stream: KeyedStream) -> np.ndarray:
    """Unbiased integer rounding of float64 `z`: floor(z) + [r < frac(z) 2^53] for r a uniform
    53-bit integer from `stream`. frac(z) 2^53 is exact in float64, so P(up) = ceil(frac 2^53) / 2^53:
    the expectation is z to within 2^-53, by integer comparison of the raw keystream."""
    low = np.floor(z)
    r = (stream.words(z.size) >> np.uint64(11)).astype(np.float64).reshape(z.shape)
    return low.astype(np.int64) + (r < (z - low) * 2.0**53).astype(np.int64)


def to_ring(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> Z_(2^bits) (two's complement)."""
    return reduce(q.astype(np.int64).view(np.uint64), bits)


def from_ring(y: np.ndarray, bits: int) -> np.ndarray:
    """Z_(2^bits) -> signed integers in [-2^(bits-1), 2^(bits-1))."""
    if bits == 64:
        return y.view(np.int64)
    signed = y.astype(np.int64)
    return np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)


@dataclass(frozen=True)
class Quantiser:
    """Clip C, scale gamma and ring size b of a secure-aggregation job."""

    clip: float
    scale: float
    bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0 and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError("clip and scale must be finite and above 0")
        if self.clip * self.scale + 1 >= 2.0**62:
            raise ValueError("clip * scale is too large for 64-bit integers")

    def integers(self, x: np.ndarray, stream: KeyedStream) -> np.ndarray:
        """Clipped, scaled, stochastically rounded int64 coordinates (before any noise)."""
        return stochastic_round(clip_l2(np.asarray(x, dtype=np.float64).ravel(), self.clip) * self.scale, stream)

    def encode(self, x: np.ndarray, stream: KeyedStream, noise: np.ndarray | None = None) -> np.ndarray:
        """The client's input to secure aggregation: integers(x) (+ integer noise) in Z_(2^bits)."""
        q = self.integers(x, stream)
        if noise is not None:
            q = q + np.asarray(noise, dtype=np.int64)
        return to_ring(q, self.bits)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The unmasked modular sum -> the float sum of the clipped updates (plus noise) / gamma."""
        return from_ring(total, self.bits).astype(np.float64) / self.scale
