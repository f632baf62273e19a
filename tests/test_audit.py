"""`gradcomp audit`: payloads pass through the real wire, each attack does what it claims on
the digits MLP, and the CLI's verdicts and JSON contract hold on a small audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from gradcomp.audit import metrics
from gradcomp.audit.analytic import analytic_attack
from gradcomp.audit.cosine import cosine_attack
from gradcomp.audit.dlg import l2_attack
from gradcomp.audit.observe import Setting, make_setting, observe
from gradcomp.cli import main
from gradcomp.compression import build, encode
from gradcomp.tasks import load_task


@pytest.fixture(scope="module")
def setting() -> Setting:
    torch.set_num_threads(1)
    return make_setting(load_task("digits-mlp"), victims=4, seed=0)


def _reid(setting: Setting, spec: str, attack, batch: int = 1) -> dict[str, float]:
    obs, truth = observe(setting, spec, batch, seed=0)
    recon = attack(obs)
    return metrics.score(recon, truth.victims, truth.victim_ids, setting.test_x, 1.0)


def test_payloads_are_what_the_wire_delivers(setting: Setting) -> None:
    obs, truth = observe(setting, "fp16", 1, seed=0)
    assert obs.mask.all()
    torch.testing.assert_close(obs.observed, truth.gradient.half().float(), rtol=0, atol=0)
    obs, truth = observe(setting, "topk(ratio=0.1)", 1, seed=0)
    kept = build("topk(ratio=0.1)").kept(truth.gradient.shape[1])
    assert (obs.mask.sum(dim=1) == kept).all()
    assert (obs.observed[~obs.mask] == 0).all()
    torch.testing.assert_close(obs.observed[obs.mask], truth.gradient[obs.mask])
    assert truth.wire_bytes == len(encode(build("topk(ratio=0.1)").compress(truth.gradient[0], key="victim-batch-0")))


def test_analytic_inversion_is_exact_on_raw_and_unit_gradients(setting: Setting) -> None:
    for spec in ("none", "unit"):
        for batch in (1, 4):
            figures = _reid(setting, spec, analytic_attack, batch)
            assert figures["reidentification"] == 1.0
            assert figures["psnr_db"] > 50


def test_cosine_attack_ignores_the_length_unit_hides(setting: Setting) -> None:
    def attack(obs):
        return cosine_attack(obs, iterations=120, seed=0)

    raw, unit = _reid(setting, "none", attack), _reid(setting, "unit", attack)
    assert raw["reidentification"] == unit["reidentification"] == 1.0
    assert unit["psnr_db"] == pytest.approx(raw["psnr_db"], abs=1.0)


def test_l2_attack_needs_the_gradients_length(setting: Setting) -> None:
    def attack(obs):
        return l2_attack(obs, iterations=100, seed=0)

    raw, unit = _reid(setting, "none", attack), _reid(setting, "unit", attack)
    assert raw["reidentification"] == 1.0
    assert unit["psnr_db"] < raw["psnr_db"] - 20  # at batch 1, unit does defeat this one attack


def test_sparse_attacks_match_only_the_sent_coordinates(setting: Setting) -> None:
    """With 10% of the coordinates sent, the attacks still single the victims out."""
    figures = _reid(setting, "topk(ratio=0.1)", lambda obs: cosine_attack(obs, iterations=120, seed=0))
    assert figures["reidentification"] >= 0.75


def test_verdict_thresholds() -> None:
    assert metrics.verdict(0.25, 5.0, 11.0) == "leaks"
    assert metrics.verdict(0.2, 5.0, 11.0) == "resists"
    assert metrics.verdict(0.0, 17.0, 11.0) == "leaks"  # real pixels without re-identification
    assert metrics.dp_epsilon("topk(ratio=0.1)") is None
    assert metrics.dp_epsilon("dp(clip=1.0, sigma=2.0, mechanism=laplace)")["epsilon"] == 0.5


def _one_gaussian_release_epsilon(sigma: float, delta: float) -> float:
    """One Gaussian release at noise multiplier sigma, by hand: RDP alpha / (2 sigma^2) at Opacus' orders,
    converted to (epsilon, delta) with Balle et al. 2020 (Thm 21), the conversion Opacus uses."""
    alphas = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    eps = alphas / (2 * sigma**2) - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    return float(eps.min())


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The tight epsilon of one Gaussian release (Balle and Wang 2018, Thm 8): any sound bound is >= it."""

    def excess(eps: float) -> float:
        a = 1 / (2 * sigma)
        return norm.cdf(a - eps * sigma) - np.exp(eps) * norm.cdf(-a - eps * sigma) - delta

    return brentq(excess, 1e-9, 200.0)


def test_dp_epsilon_of_one_payload_is_the_gaussian_mechanisms() -> None:
    """Computed apart from gradcomp.privacy: the closed-form RDP figure, and never below the exact one."""
    for sigma in (0.5, 1.0, 2.0):
        got = metrics.dp_epsilon(f"dp(clip=1.0, sigma={sigma})")
        assert got is not None and got["delta"] == 1e-5 and got["releases"] == 1
        assert got["epsilon"] == pytest.approx(_one_gaussian_release_epsilon(sigma, 1e-5), rel=1e-9)
        assert _exact_gaussian_epsilon(sigma, 1e-5) <= got["epsilon"] <= 1.5 * _exact_gaussian_epsilon(sigma, 1e-5)


def test_cli_flags_none_and_unit_and_passes_dp(tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    specs = ["none", "unit", "dp(clip=1.0, sigma=0.5)"]
    argv = ["audit", *[a for s in specs for a in ("--spec", s)], "--victims", "4", "--iterations", "40"]
    argv += ["--setting", "init"]  # the other settings: tests/test_audit_settings.py
    assert main([*argv, "--batch-size", "1", "--batch-size", "4", "--out", str(out)]) == 0
    entries = json.loads(out.read_text())
    assert [e["spec"] for e in entries] == specs
    for e in entries:
        assert {"spec", "reidentification", "psnr_db", "verdict", "attacks"} <= set(e)
        assert set(e["attacks"]) == {"analytic", "cosine-tv", "dlg-l2"}
        assert e["reidentification"] == max(a["reidentification"] for a in e["attacks"].values())
    none, unit, dp = entries
    assert none["verdict"] == unit["verdict"] == "leaks"
    assert none["reidentification"] >= 0.8 and unit["reidentification"] >= 0.8
    assert dp["verdict"] == "resists" and dp["reidentification"] <= 0.2
    assert dp["dp"]["epsilon"] == pytest.approx(_one_gaussian_release_epsilon(0.5, 1e-5), rel=1e-9)
    assert none["dp"] is None
    assert out.with_suffix(".png").stat().st_size > 1000


def test_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    out = str(tmp_path / "a.json")
    assert main(["audit", "--spec", "topk(ratio=2)", "--out", out]) == 2
    assert main(["audit", "--spec", "none", "--batch-size", "9", "--victims", "8", "--out", out]) == 2
    assert not Path(out).exists()
