"""benchmarks/ddp_utility.py at its smallest setting: the JSON it writes, and that every run's ledger
reports the epsilon its noise multiplier was calibrated for (central, distributed, local)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _dp_calibrate import TOLERANCE, calibrate, participations  # noqa: E402

MODES = ("central", "distributed", "local")


def job(mode: str, clients: int, per_round: int, rounds: int) -> dict:
    data = {
        "name": "calibrate",
        "task": {"name": "digits-mlp"},
        "rounds": rounds,
        "clients": {"expected": clients},
        "round": {"fraction": per_round / clients},
        "compression": "none",
        "privacy": {"mode": mode, "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
        "simulation": {"dropout": 0.0, "actors": 0},
    }
    if mode == "distributed":
        data["secure_aggregation"] = {"bits": 32, "min_survivors": per_round}
    return data


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "ddp_utility.json"
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "ddp_utility.py"), "--epsilons", "8",
           "--seeds", "0", "1", "--rounds", "1", "--clients", "8", "--per-round", "4", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)
    return json.loads(out.read_text())


def test_json_structure_and_epsilons_match_targets(report: dict) -> None:
    assert set(report) >= {"environment", "settings", "tolerance", "results", "no_dp", "targets"}
    res = report["results"]["8.0"]
    assert set(res["seeds"]) == {"0", "1"}
    for runs in res["seeds"].values():
        assert set(runs) == {*MODES, "central@ddp-z"}
        for mode in MODES:
            run = runs[mode]
            assert 0.0 <= run["accuracy"] <= 1.0 and run["loss"] > 0 and run["uplink_bytes"] > 0
            assert 8.0 * (1 - TOLERANCE) <= run["epsilon"] <= 8.0
            assert run["epsilon"] == pytest.approx(run["planned_epsilon"], rel=1e-9)
        assert runs["local"]["busiest_client_rounds"] == 1  # one round: every asked client once
        same = runs["central@ddp-z"]
        assert same["z"] == runs["distributed"]["z"]
        # central DP at the same z is charged less: amplification by sampling (q = 4/8) that SecAgg's q = 1 lacks
        assert same["epsilon"] < runs["distributed"]["epsilon"]
    acc = res["summary"]["accuracy"]
    assert acc["central"]["se"] is not None and "diff_se" in acc["distributed"] and "note" in acc
    assert set(report["targets"]["8.0"]) == {
        "ddp_minus_central", "within_target", "ddp_minus_local", "ddp_resolved_from_central",
        "ddp_minus_central_same_z", "same_z_se", "same_z_resolved",
    }  # fmt: skip
    assert report["no_dp"]["accuracy"]["mean"] > 0


def test_summarise_recomputes_the_same_report(report: dict, tmp_path: Path) -> None:
    from ddp_utility import resummarise

    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    again = json.loads(json.dumps(resummarise(str(path))))
    assert again["targets"] == report["targets"]
    assert again["results"]["8.0"]["summary"] == report["results"]["8.0"]["summary"]
    same = again["results"]["8.0"]["summary"]["accuracy_distributed_vs_same_z"]
    assert same["seeds"] == [0, 1] and "diff" in same


def test_participations_replay_the_coordinators_sampler() -> None:
    counts = participations(job("local", 10, 3, 6))
    assert sum(counts.values()) == 3 * 6 and max(counts.values()) <= 6
    assert counts == participations(job("local", 10, 3, 6))  # the seeded sampler, not fresh randomness


def test_distributed_and_local_agree_when_every_client_is_asked_every_round() -> None:
    """Both are the Gaussian mechanism at q = 1 over the same releases (KLS's tau is negligible at
    these variances), so the calibrated noise multipliers must agree."""
    z_local, eps_local = calibrate(job("local", 4, 4, 3), 5.0)
    z_ddp, eps_ddp = calibrate(job("distributed", 4, 4, 3), 5.0)
    assert z_ddp == pytest.approx(z_local, rel=5 * TOLERANCE)
    for eps in (eps_local, eps_ddp):
        assert 5.0 * (1 - TOLERANCE) <= eps <= 5.0
