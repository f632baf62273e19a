"""The delta a noise sampler's finite reach costs, and where the accountants add it or refuse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from pydantic import ValidationError

from gradcomp import exact_noise
from gradcomp.audit import metrics
from gradcomp.config.fed import FedJob
from gradcomp.config.train import DPConfig
from gradcomp.fedclient.ledger import BudgetSpent, ClientLedger
from gradcomp.privacy import (
    NEGLIGIBLE_SHARE,
    ParticipationLedger,
    PrivacyLedger,
    gaussian_epsilon,
    gaussian_residual_delta,
    laplace_residual_delta,
)

OLD_REACH = math.sqrt(-2 * math.log(2.0**-54))  # 53-bit uniforms, smallest (0 + 0.5) * 2^-53: 8.652
DELTA = 1e-5


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _opacus(z: float, steps: int, q: float = 1.0, delta: float = DELTA) -> float:
    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    return float(acc.get_epsilon(delta=delta))


def test_the_old_reach_voids_small_noise_multipliers_and_the_new_one_does_not() -> None:
    assert pytest.approx(8.652, abs=1e-3) == OLD_REACH
    # z = 0.1: the neighbour's shift (10 sigma) is past the old reach, so no delta holds at all
    assert gaussian_residual_delta(0.1, coordinates=1, reach=OLD_REACH) == 1.0
    old = PrivacyLedger(DELTA, reach=OLD_REACH)
    assert old.step(0.1, 1.0) == math.inf and old.epsilon_after(0.2, 1.0) == math.inf
    # the bound is never below the floor the truncation provably puts on delta, Phi(1/z - reach)
    for z in (0.2, 0.228, 0.3, 0.5):
        assert gaussian_residual_delta(z, coordinates=1, reach=OLD_REACH) >= _phi(1 / z - OLD_REACH)
    assert gaussian_residual_delta(0.2, coordinates=1, reach=OLD_REACH) > NEGLIGIBLE_SHARE * DELTA
    # with the sampler as built, the residual at z = 0.1 over 2^40 coordinates is below 1e-150
    assert PrivacyLedger(DELTA).reach == exact_noise.GAUSSIAN_REACH
    assert 0 < gaussian_residual_delta(0.1) < 1e-150 and gaussian_residual_delta(0.05) < 1e-54
    eps = PrivacyLedger(DELTA).step(0.1, 1.0)
    assert eps == pytest.approx(_opacus(0.1, 1), rel=1e-9) and eps == pytest.approx(96.1, abs=0.1)


def test_the_residual_grows_with_releases_and_coordinates_and_refuses_past_its_share() -> None:
    one = gaussian_residual_delta(0.04, 1)
    assert gaussian_residual_delta(0.04, 1000) == pytest.approx(1000 * one)
    assert gaussian_residual_delta(0.04, 1, coordinates=2**20) == pytest.approx(one / 2**20)
    assert gaussian_residual_delta(0.04, 0) == 0.0 and gaussian_residual_delta(0.0) == 1.0
    # z = 0.035 at delta 1e-5: 3e-6 per release over 2^40 coordinates, not negligible
    assert gaussian_residual_delta(0.035) > NEGLIGIBLE_SHARE * DELTA > gaussian_residual_delta(0.036)
    assert PrivacyLedger(DELTA).step(0.035, 1.0) == math.inf
    # below the share, epsilon is the ideal mechanism's at delta less the residual (1.7e-9 here)
    residual = gaussian_residual_delta(0.036)
    assert PrivacyLedger(DELTA).step(0.036, 1.0) == _opacus(0.036, 1, delta=DELTA - residual) > _opacus(0.036, 1)
    assert ParticipationLedger(0.035, DELTA).epsilon_for(3) == math.inf
    assert gaussian_epsilon(0.036, 3, DELTA) < math.inf


def test_a_budget_refuses_what_the_sampler_cannot_back(tmp_path: Path) -> None:
    ledger = ClientLedger(tmp_path / "k.ledger.json", DELTA, max_epsilon=10_000.0)
    assert ledger.charge("a", 0.5) < 10_000
    with pytest.raises(BudgetSpent):
        ledger.charge("b", 0.03)
    assert "b" not in ledger.releases


def test_job_configs_refuse_noise_multipliers_the_sampler_cannot_back() -> None:
    with pytest.raises(ValidationError, match="sampler reaches"):
        DPConfig(noise_multiplier=0.03, delta=DELTA)
    assert DPConfig(noise_multiplier=0.05, delta=DELTA).noise_multiplier == 0.05
    assert DPConfig(noise_multiplier=0.0).noise_multiplier == 0.0  # no noise: infinite epsilon, said so
    base = {"rounds": 5, "clients": {"expected": 10}}
    for mode in ("central", "local"):
        privacy = {"mode": mode, "clip": 1.0, "noise_multiplier": 0.03, "delta": DELTA}
        with pytest.raises(ValidationError, match="sampler reaches"):
            FedJob.model_validate({**base, "privacy": privacy})
        ok = FedJob.model_validate({**base, "privacy": {**privacy, "noise_multiplier": 0.1}})
        assert ok.dp_params() == (1.0, 0.1)


def test_laplace_is_pure_but_for_its_reach() -> None:
    out = metrics.dp_epsilon("dp(clip=1.0, sigma=0.1, mechanism=laplace)")
    assert out is not None and out["epsilon"] == pytest.approx(10.0)
    assert out["delta"] == laplace_residual_delta(10.0) and 0 < out["delta"] < 1e-280
    # the inverse-CDF sampler it replaces ended at 53 log 2 = 36.7: a residual of 1e-11 at epsilon 10
    assert laplace_residual_delta(10.0, coordinates=1, reach=53 * math.log(2)) > 1e-12
    assert laplace_residual_delta(800.0) == 1.0 and laplace_residual_delta(1.0, 0) == 0.0
