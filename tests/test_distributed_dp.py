"""Distributed discrete-Gaussian DP: the accounting (KLS 2021) against Opacus in the limit where they
must agree, the sensitivity that conditional rounding guarantees, and the noise a secure-aggregation
round really carries (measured on the unmasked sum of real SecAgg+ rounds)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from gradcomp.keyed_random import KeyedStream, new_key
from gradcomp.secagg.ddp import (
    DistributedLedger,
    RoundingFailed,
    client_sigma_sq,
    conditional_round,
    epsilon_from_zcdp,
    planned_epsilon,
    rounded_norm_bound,
    sum_zcdp,
    tau,
)
from gradcomp.secagg.params import SecAggParams
from gradcomp.secagg.quantise import Quantiser, from_ring, to_ring
from gradcomp.secagg.simulate import run_round


def _opacus_epsilon(z: float, rounds: int, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(z, 1.0, rounds)]
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 10), (2.0, 50), (0.7, 3)])
def test_large_noise_agrees_with_opacus_continuous_gaussian(z: float, rounds: int) -> None:
    """sigma_c large: tau ~ 0 and the sum is a Gaussian mechanism of multiplier sqrt(n) sigma_c / D at q = 1."""
    sensitivity, n, dim, delta = 40.0, 20, 10_000, 1e-5
    sigma_sq = (z * sensitivity) ** 2 / n
    assert tau(sigma_sq, n) * dim < 1e-30
    ours = planned_epsilon(rounds, sensitivity, sigma_sq, n, dim, delta)
    assert ours == pytest.approx(_opacus_epsilon(z, rounds, delta), rel=1e-6)


def test_small_noise_pays_for_the_sum_not_being_a_discrete_gaussian() -> None:
    n, dim, d2 = 50, 1_000_000, 2.0
    small = 0.3  # sigma_c^2: tau is not negligible
    continuous = epsilon_from_zcdp(d2**2 / (2 * n * small), 1e-5)
    assert tau(small, n) * dim > 1
    assert epsilon_from_zcdp(sum_zcdp(d2, small, n, dim), 1e-5) > 1.5 * continuous
    with pytest.raises(ValueError, match="sigma_c >= 1/2"):
        sum_zcdp(d2, 0.2, n, dim)


def test_ledger_charges_what_the_survivors_added() -> None:
    ledger = DistributedLedger(1e-5)
    more = ledger.charge(10.0, 25.0, survivors=40, dim=1000)
    fewer = ledger.charge(10.0, 25.0, survivors=20, dim=1000)
    assert fewer == pytest.approx(2 * more)  # half the survivors: half the noise variance
    assert ledger.epsilon == pytest.approx(epsilon_from_zcdp(more + fewer, 1e-5))
    assert DistributedLedger.from_state(ledger.state_dict()).epsilon == ledger.epsilon


def test_client_sigma_reaches_the_target_at_min_survivors() -> None:
    s = client_sigma_sq(1.2, 30.0, 16)
    assert isinstance(s, Fraction) and 16 * s >= (1.2 * 30.0) ** 2


def test_conditional_rounding_bounds_the_norm_and_stays_unbiased() -> None:
    dim, c = 4000, 20.0
    bound = rounded_norm_bound(c, dim, 1e-6)
    assert c < bound < c + math.sqrt(dim)
    stream = KeyedStream(new_key())
    x = np.random.default_rng(0).normal(size=dim)
    x *= c / np.linalg.norm(x)
    draws = np.stack([conditional_round(x, stream, bound) for _ in range(200)])
    assert (np.linalg.norm(draws.astype(np.float64), axis=1) <= bound).all()
    assert np.abs(draws.mean(0) - x).max() < 0.2  # unbiased to within sampling error (std 0.5/sqrt(200))
    with pytest.raises(RoundingFailed):
        conditional_round(x, stream, c / 2)  # no rounding of a norm-c vector is that short


def test_a_secure_aggregation_round_carries_the_survivors_noise() -> None:
    """Real SecAgg+ rounds: the unmasked sum minus the sum of the noiseless quantised inputs is the
    survivors' noise, with variance n sigma_c^2 (the discrete Gaussian's, a little below sigma_c^2)."""
    n, dim, bits = 8, 3000, 32
    q = Quantiser(clip=1.0, scale=50.0, bits=bits)
    sigma_sq = Fraction(9)
    params = SecAggParams(degree=6, threshold=4, min_survivors=5, bits=bits)
    rng = np.random.default_rng(1)
    clean, inputs = {}, {}
    for cid in range(n):
        clean[cid] = q.integers(rng.normal(size=dim) * 0.01, KeyedStream(new_key()))
        inputs[cid] = to_ring(clean[cid] + KeyedStream(new_key()).discrete_gaussian(dim, sigma_sq), bits)
    report = run_round(inputs, params, completes={7: 2})  # client 7 drops before its masked input
    assert report.aborted is None and report.survivors == frozenset(range(7))
    exact = sum(clean[c] for c in report.survivors)
    noise = from_ring(report.total, bits) - exact
    assert noise.var() == pytest.approx(7 * float(sigma_sq), rel=0.1)
    assert abs(noise.mean()) < 4 * math.sqrt(7 * 9 / dim)
