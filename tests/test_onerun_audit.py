"""One-run privacy audit of DP-SGD (Steinke, Nasr, Jagielski 2023): the bound's arithmetic, a
correctly accounted run stays under its accountant, and a mis-accounted one is caught."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom

from gradcomp.audit.onerun import OneRunConfig, epsilon_lower_bound, one_run_audit, p_value
from gradcomp.privacy import gaussian_epsilon


def test_p_value_is_the_randomised_response_tail_plus_the_delta_term() -> None:
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(1000, 100, 70, 1.0, 0.0) == pytest.approx(float(binom.sf(69, 100, q)))
    assert p_value(1000, 100, 70, 1.0, 1e-5) > p_value(1000, 100, 70, 1.0, 0.0)
    # chance-level guessing rejects nothing; more correct guesses reject more
    assert epsilon_lower_bound(1000, 100, 50, 1e-5, 0.05) == 0.0
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5, 0.05) for v in (70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    eps = bounds[1]
    assert p_value(1000, 100, 80, eps, 1e-5) == pytest.approx(0.05, abs=1e-3)  # the bound sits at the level


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.slow
def test_correct_dp_sgd_stays_under_its_ledger() -> None:
    """Noise multiplier 2: the ledger's 1.93 is below the 3.47 that 100 right guesses prove, so this
    check can fail; the correct mechanism stays well under it."""
    result = one_run_audit(OneRunConfig(noise_multiplier=2.0, epochs=20))
    assert result["steps"] == 600 and result["guesses"] == 100
    # the audited epsilon is what the run's ledger reports, charged step by step as in training
    assert result["epsilon_accountant"] == pytest.approx(
        gaussian_epsilon(2.0, 600, 1e-5, sample_rate=result["sample_rate"])
    )
    assert result["epsilon_lower_bound"] <= result["epsilon_accountant"] < 3.0
    assert result["consistent"]


@pytest.mark.slow
def test_a_run_that_adds_no_noise_is_caught() -> None:
    """The same job whose mechanism adds no noise: every guess right (a canary never sampled in 600
    steps at q = 0.033 has probability 2e-9), a bound of ~3.47 above the ledger's epsilon."""
    result = one_run_audit(OneRunConfig(noise_multiplier=2.0, noise_scale=0.0, epochs=20))
    assert result["correct_guesses"] == 100
    assert result["epsilon_lower_bound"] > 3.4 > result["epsilon_accountant"]
    assert not result["consistent"]
