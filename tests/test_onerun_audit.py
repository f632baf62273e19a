"""One-run privacy audit of DP-SGD (Steinke, Nasr, Jagielski 2023): the bound's arithmetic, a
correctly accounted run stays under its accountant, and a mis-accounted one is caught."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom

from gradcomp.audit.onerun import OneRunConfig, epsilon_lower_bound, one_run_audit, p_value


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


def test_correct_dp_sgd_stays_under_its_accountant() -> None:
    result = one_run_audit(OneRunConfig(noise_multiplier=1.0, epochs=20))
    assert result["steps"] == 600 and result["guesses"] == 100
    assert 0 < result["epsilon_lower_bound"] <= result["epsilon_accountant"]
    assert result["consistent"]


def test_a_mis_accounted_run_is_caught() -> None:
    """0.2 noise added but 5.0 charged: the empirical lower bound passes the claimed epsilon."""
    result = one_run_audit(OneRunConfig(noise_multiplier=0.2, accounted_noise_multiplier=5.0, epochs=20))
    assert result["epsilon_lower_bound"] > result["epsilon_accountant"]
    assert not result["consistent"]
