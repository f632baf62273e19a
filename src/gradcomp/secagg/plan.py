"""What one secure-aggregation job settles before its first round: the ring, the quantiser, the
sensitivity, each client's noise and the SecAgg+ graph settings.

The coordinator makes the plan from the job and the model size and sends the client's part
(`ClientEncoding`) in every training config; clients quantise and noise by it, and the ledger
charges each round by it (`secagg/ddp.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from gradcomp.secagg.ddp import client_sigma_sq, rounded_norm_bound
from gradcomp.secagg.params import SecAggParams, settings_for
from gradcomp.secagg.quantise import WrapError, check_no_wrap, discrete_gaussian_tail

WRAP_FAILURE = 1e-12  # the chance the noise of a round's clients makes a coordinate wrap
# The default scale puts the clipped norm at this many integer units: rounding (variance 1/4 per
# coordinate) stays far below the signal, and the noise's variance parameter stays small enough for
# the exact sampler's int64 fast path (around 10^7 for z ~ 1).
TARGET_SCALED_CLIP = 2.0**13


@dataclass(frozen=True)
class ClientEncoding:
    """How a client turns its update into its secure-aggregation input."""

    bits: int
    clip: float
    scale: float
    norm_bound: float  # conditional rounding redraws until the rounded norm is at most this
    sigma_sq: str  # each client's discrete-Gaussian variance parameter as a fraction "p/q" ("0": none)

    def noise_sigma_sq(self) -> Fraction:
        return Fraction(self.sigma_sq)


@dataclass(frozen=True)
class SecurePlan:
    params: SecAggParams
    encoding: ClientEncoding
    dim: int  # values each client sends (the update's size after shared-coordinate selection)

    @property
    def sensitivity(self) -> float:
        return self.encoding.norm_bound


def make_plan(
    *,
    clients_per_round: int,
    dim: int,
    clip: float,
    bits: int,
    noise_multiplier: float | None,
    beta: float,
    scale: float | None = None,
    degree: int | None = None,
    threshold: int | None = None,
    min_survivors: int | None = None,
) -> SecurePlan:
    """The plan for rounds of `clients_per_round` clients sending `dim` values; refuses settings that
    could wrap (`WrapError`) or that the graph bounds refuse (`ValueError`)."""
    params = _graph(clients_per_round, bits, degree, threshold, min_survivors)
    gamma = scale if scale is not None else _largest_scale(clients_per_round, dim, clip, bits, noise_multiplier, beta)
    bound = rounded_norm_bound(clip * gamma, dim, beta)
    sigma_sq = Fraction(0)
    if noise_multiplier:
        sigma_sq = max(client_sigma_sq(noise_multiplier, bound, params.min_survivors), Fraction(1, 4))
    tail = discrete_gaussian_tail(float(sigma_sq), dim, clients_per_round, WRAP_FAILURE) if sigma_sq else 0.0
    check_no_wrap(clients_per_round, clip, gamma, bits, tail)
    return SecurePlan(params, ClientEncoding(bits, clip, gamma, bound, str(sigma_sq)), dim)


def _graph(n: int, bits: int, degree: int | None, threshold: int | None, min_survivors: int | None) -> SecAggParams:
    auto = settings_for(max(n, 3), bits)
    k = degree if degree is not None else auto.degree
    t = threshold if threshold is not None else k // 2 + 1
    m = min_survivors if min_survivors is not None else t + 1
    if m > n:
        raise ValueError(f"secure_aggregation.min_survivors ({m}) exceeds the clients asked per round ({n})")
    return SecAggParams(degree=k, threshold=t, min_survivors=m, bits=bits)


def _largest_scale(n: int, dim: int, clip: float, bits: int, z: float | None, beta: float) -> float:
    """The largest power-of-two gamma, at most TARGET_SCALED_CLIP / clip, whose sum of n clients (noise
    included) keeps a factor 4 of headroom in the ring: noise grows with gamma (it is sized by the
    sensitivity gamma C)."""
    limit = 2.0 ** (bits - 1) / 4
    gamma = 2.0 ** math.floor(math.log2(min(limit / (n * clip), TARGET_SCALED_CLIP / clip)))
    while gamma >= 2.0**-20:
        bound = rounded_norm_bound(clip * gamma, dim, beta)
        sigma_sq = float(client_sigma_sq(z, bound, 1)) if z else 0.0  # at most one client's share of all
        tail = discrete_gaussian_tail(sigma_sq, dim, n, WRAP_FAILURE) if sigma_sq else 0.0
        if n * (clip * gamma + 1 + tail) < limit:
            return gamma
        gamma /= 2
    raise WrapError(f"no quantisation scale fits {n} clients of clip {clip} in {bits} bits: use more bits")
