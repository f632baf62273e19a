"""Distributed discrete-Gaussian DP over secure aggregation (Kairouz, Liu, Steinke 2021), and its accounting.

Each client adds discrete Gaussian noise N_Z(0, sigma_c^2) to every integer coordinate of its clipped,
scaled, rounded update before masking, so the sum the coordinator unmasks carries the noise of every
survivor, and no party ever sees a less-noised value than that sum.

Adversary: the coordinator, honest but curious, colluding with fewer than `threshold` clients, and
anyone who sees the released models; it learns only the noised sum of at least `min_survivors`
updates (secure aggregation, `secagg/`). Neighbouring datasets differ in one client's whole update.
Out of scope: an actively malicious coordinator (it could claim survivors dropped to weaken the sum;
the ledger charges the survivors it reports), and a client that adds less noise than asked (each
client's own share is what it trusts; the guarantee assumes the honest clients' noise only if
sigma_c is sized for the honest survivors: see `client_sigma_sq`).

Sensitivity. A client's update is clipped to L2 norm C, scaled by gamma and rounded stochastically.
Plain stochastic rounding can lengthen a d-dimensional vector by up to sqrt(d); `conditional_round`
redraws the rounding until the norm is at most `rounded_norm_bound(gamma C, d, beta)` (KLS Sec. 4.1,
which fails a draw with probability at most beta), so the L2 sensitivity of the sum is that bound,
deterministically.

Privacy of the sum (KLS Theorem 1): with n survivors each adding N_Z(0, sigma_c^2)^d, sigma_c >= 1/2,
every neighbouring pair within L2 distance D satisfies D_alpha <= alpha eps^2 / 2 for all alpha >= 1,
eps = min(sqrt(D^2/(n sigma_c^2) + 2 tau d), D/(sqrt(n) sigma_c) + tau sqrt(d)),
tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma_c^2 k / (k + 1)).
That is rho-zCDP with rho = eps^2 / 2: Renyi DP at every order alpha of alpha rho. Rounds compose by
adding rho (no amplification by client sampling is claimed: each released round is charged as if
every client took part). (epsilon, delta) comes from the Renyi curve with the same conversion Opacus'
RDP accountant uses (Balle et al. 2020), so in the limit tau -> 0 the figure is exactly that of the
Gaussian mechanism with noise multiplier sqrt(n) sigma_c / D at sampling rate 1, which a test checks
against Opacus. Google's dp-accounting has a discrete-Gaussian privacy loss for one one-dimensional
discrete Gaussian; the sum of n d-dimensional discrete Gaussians is not one, so KLS's bound is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from gradcomp.errors import GradcompError
from gradcomp.keyed_random import KeyedStream
from gradcomp.secagg.quantise import stochastic_round

# Renyi orders the conversion minimises over (Opacus' default grid, extended upwards).
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024])
MAX_ROUNDING_TRIES = 64


class RoundingFailed(GradcompError, RuntimeError):
    """Conditional rounding found no draw within the bound (probability <= beta per try)."""


def rounded_norm_bound(scaled_clip: float, dim: int, beta: float) -> float:
    """The L2 norm a stochastically rounded vector of norm <= `scaled_clip` exceeds with probability
    at most `beta` (KLS: min((c + sqrt(d))^2, c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))."""
    if scaled_clip <= 0 or dim < 1 or not 0 < beta < 1:
        raise ValueError("scaled_clip must be > 0, dim >= 1, beta in (0, 1)")
    c, d = scaled_clip, float(dim)
    worst = (c + math.sqrt(d)) ** 2
    likely = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return math.sqrt(min(worst, likely))


def conditional_round(z: np.ndarray, stream: KeyedStream, bound: float) -> np.ndarray:
    """Stochastic rounding of `z`, redrawn until the result's L2 norm is at most `bound` (so the
    sensitivity is `bound` whatever the draw); raises `RoundingFailed` after `MAX_ROUNDING_TRIES`."""
    for _ in range(MAX_ROUNDING_TRIES):
        q = stochastic_round(z, stream)
        if float(np.linalg.norm(q.astype(np.float64))) <= bound:
            return q
    raise RoundingFailed(f"no rounding within L2 norm {bound:.6g} in {MAX_ROUNDING_TRIES} tries")


def tau(sigma_sq: float, n: int) -> float:
    """KLS's tau: how far the sum of n discrete Gaussians is from one discrete Gaussian."""
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma_sq * k / (k + 1)) for k in range(1, n))


def sum_zcdp(sensitivity: float, sigma_sq: float, n: int, dim: int) -> float:
    """rho of one release of the sum of `n` clients' N_Z(0, sigma_sq)^dim noise at L2 `sensitivity`."""
    if sigma_sq < 0.25:
        raise ValueError(f"KLS's bound needs sigma_c >= 1/2 (sigma_c^2 >= 0.25), got {sigma_sq}")
    if n < 1 or dim < 1 or sensitivity <= 0:
        raise ValueError("n and dim must be >= 1 and the sensitivity > 0")
    t = tau(sigma_sq, n)
    eps = min(
        math.sqrt(sensitivity**2 / (n * sigma_sq) + 2 * t * dim),
        sensitivity / (math.sqrt(n) * math.sqrt(sigma_sq)) + t * math.sqrt(dim),
    )
    return eps * eps / 2


def client_sigma_sq(noise_multiplier: float, sensitivity: float, min_survivors: int) -> Fraction:
    """Each client's variance parameter so that `min_survivors` of them sum to a noise multiplier of
    at least `noise_multiplier` (sum variance (z D)^2), as a Fraction for the exact sampler."""
    if noise_multiplier <= 0 or sensitivity <= 0 or min_survivors < 1:
        raise ValueError("noise_multiplier and sensitivity must be > 0, min_survivors >= 1")
    per_client = (noise_multiplier * sensitivity) ** 2 / min_survivors
    if per_client >= 1:  # an integer keeps the exact sampler's arithmetic small
        return Fraction(math.ceil(per_client))
    return Fraction(per_client).limit_denominator(2**10) + Fraction(1, 2**10)  # rounded up, never below


def epsilon_from_zcdp(rho: float, delta: float) -> float:
    """(epsilon, delta) of a rho-zCDP mechanism through its Renyi curve alpha rho (Opacus' conversion)."""
    if rho <= 0:
        return 0.0
    best = math.inf
    for a in ORDERS:
        best = min(best, a * rho - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return max(best, 0.0)


@dataclass
class DistributedLedger:
    """The rounds a distributed-DP job released: each round's rho (from the survivors it really had)."""

    delta: float
    rhos: list[float] = field(default_factory=list)

    def charge(self, sensitivity: float, sigma_sq: float, survivors: int, dim: int) -> float:
        """Charge one released sum; returns the round's rho."""
        rho = sum_zcdp(sensitivity, float(sigma_sq), survivors, dim)
        self.rhos.append(rho)
        return rho

    @property
    def epsilon(self) -> float:
        return epsilon_from_zcdp(sum(self.rhos), self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "rhos": list(self.rhos)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DistributedLedger:
        return cls(float(state["delta"]), [float(r) for r in state["rhos"]])


def planned_epsilon(rounds: int, sensitivity: float, sigma_sq: float, survivors: int, dim: int, delta: float) -> float:
    """The epsilon a job would report after `rounds` rounds of `survivors` each."""
    return epsilon_from_zcdp(rounds * sum_zcdp(sensitivity, sigma_sq, survivors, dim), delta)
