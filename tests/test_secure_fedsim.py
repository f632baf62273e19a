"""Federated simulation under secure aggregation: the coordinator receives only the unmasked sum of the
survivors' quantised inputs (real SecAgg+ state machines), the released model is their mean, dropouts and
stragglers are unmasked around, too few survivors abort and retry, and distributed DP's epsilon is the
ledger's figure for the survivors each round really had."""

from __future__ import annotations

import pytest
import torch

from gradcomp.secagg.ddp import planned_epsilon
from gradcomp.sim.setup import build_simulation, fedsim_job

BASE = {
    "name": "sec",
    "task": {"name": "digits-mlp", "args": {"hidden": 8}},
    "clients": {"expected": 8},
    "rounds": 2,
    "round": {"fraction": 1.0, "min_clients": 1},
    "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "simulation": {"actors": 0},
}


def _sim(**extra):
    sim, _ = build_simulation(fedsim_job({**BASE, **extra}), quiet=True)
    return sim


def _delta(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[k] - before[k]).reshape(-1) for k in before])


@pytest.mark.parametrize("spec", ["none", "randomk(ratio=0.25, seed=3)"])
def test_the_secure_round_releases_the_plaintext_mean_to_within_rounding(spec: str) -> None:
    plain, secure = _sim(compression=spec), _sim(compression=spec, secure_aggregation={"clip": 5.0})
    start = {k: v.clone() for k, v in plain.coord.params.items()}
    entries = [s.run_round()[0] for s in (plain, secure)]
    assert all(e is not None for e in entries) and secure.coord.version == 1
    want, got = _delta(plain.coord.params, start), _delta(secure.coord.params, start)
    scale = secure.coord.secure_plan.encoding.scale
    assert float((got - want).abs().max()) <= 1.0 / scale + 1e-6  # one rounding step of the mean, at most
    assert float(want.abs().max()) > 10 / scale  # the update is far larger than that
    assert "examples" not in entries[1] and "train_loss" not in entries[1]  # sums only: no per-client claims


def test_dropouts_and_stragglers_are_unmasked_around_and_too_few_abort(monkeypatch) -> None:
    sim = _sim(
        secure_aggregation={"clip": 10.0, "min_survivors": 5},
        simulation={"actors": 0, "dropout": 0.3, "secret_seed": 4},
    )
    entry, stats = sim.run_round()
    assert entry is not None
    assert 5 <= entry["clients"] <= 8 - stats.dropped
    # a round whose clients cannot reach min_survivors aborts without unmasking, is retried, and fails
    hopeless = _sim(
        secure_aggregation={"clip": 10.0, "min_survivors": 8},
        simulation={"actors": 0, "dropout": 0.9, "secret_seed": 1},
        round={"fraction": 1.0, "min_clients": 1, "max_retries": 1, "deadline_seconds": 5},
    )
    hopeless.run()
    assert hopeless.coord.status == "failed" and hopeless.coord.version == 0


def test_distributed_dp_charges_each_round_at_its_survivors() -> None:
    sim = _sim(
        privacy={"mode": "distributed", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
        secure_aggregation={"min_survivors": 5},
    )
    sim.run()
    plan, log = sim.coord.secure_plan, sim.coord.log
    assert plan is not None and len(log) == 2 and all(e["survivors"] == 8 for e in log)
    e = plan.encoding
    want = planned_epsilon(2, e.norm_bound, float(e.noise_sigma_sq()), 8, plan.dim, 1e-5)
    assert log[-1]["epsilon"] == pytest.approx(want, rel=1e-9) and sim.coord.epsilon == log[-1]["epsilon"]
    # sized for 5 survivors at z = 1: 8 survivors carry more noise than that
    assert 5 * float(e.noise_sigma_sq()) >= e.norm_bound**2
    assert want < planned_epsilon(2, e.norm_bound, float(e.noise_sigma_sq()), 5, plan.dim, 1e-5)


def test_jobs_that_cannot_be_summed_under_masks_are_refused() -> None:
    for extra, match in [
        ({"compression": "topk(ratio=0.1)"}, "cannot be summed"),
        ({"strategy": "median"}, "needs each client's update"),
        ({"privacy": {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0}}, "not local"),
        ({"privacy": {"mode": "distributed", "clip": 1.0, "noise_multiplier": 1.0}, "secure_aggregation": None},
         "add secure_aggregation"),
    ]:  # fmt: skip
        with pytest.raises(Exception, match=match):
            fedsim_job({**BASE, "secure_aggregation": {"clip": 1.0}, **extra})
