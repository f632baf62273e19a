"""Local client-level DP: the coordinator is the adversary, so each client's epsilon is the
Gaussian mechanism over its own participations at q = 1 (Opacus' accountant), reported as the
worst client with the distribution; the released-model figure is reported apart, labelled."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant

from gradcomp.compression import Dense
from gradcomp.config.fed import FedJob
from gradcomp.privacy import ParticipationLedger, gaussian_epsilon
from gradcomp.server import store
from gradcomp.server.core import BUDGET_EXHAUSTED, Coordinator

SIGMA, DELTA = 1.2, 1e-5
PARAMS = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def dense_update(value: float) -> dict[str, Dense]:
    return {k: Dense(torch.full((v.numel(),), value), tuple(v.shape), v.dtype) for k, v in PARAMS.items()}


def _opacus(participations: int) -> float:
    acc = RDPAccountant()
    acc.history = [(SIGMA, 1.0, participations)]
    return float(acc.get_epsilon(delta=DELTA))


def _job(**privacy: object) -> FedJob:
    return FedJob.model_validate(
        {
            "rounds": 12,
            "clients": {"expected": 6, "min": 6},
            "round": {"fraction": 0.34, "min_clients": 2},  # 3 of 6 clients per round
            "privacy": {"mode": "local", "clip": 1.0, "noise_multiplier": SIGMA, "delta": DELTA, **privacy},
        }
    )


def _run(c: Coordinator, rounds: int) -> dict[str, int]:
    """Run `rounds` rounds where every selected client reports; returns each client's rounds."""
    names = [f"c{i}" for i in range(6)]
    for n in names:
        c.register(n)
    seen = dict.fromkeys(names, 0)
    for _ in range(rounds):
        chosen = c.select_clients()
        if not chosen:
            break
        for n in chosen:
            c.accept_update(n, c.version + 1, 5, dense_update(0.1))
            seen[n] += 1
        c.finish_round(force=True)
    return seen


def test_each_clients_epsilon_is_the_gaussian_mechanism_over_its_own_rounds() -> None:
    c = Coordinator(_job(), PARAMS)
    seen = _run(c, 12)
    assert sorted(seen.values()) != [4] * 6  # clients took part unequally: the figure is per client
    ledger = c.client_ledger
    assert ledger is not None
    for name, rounds in seen.items():
        assert ledger.participations.get(name, 0) == rounds
        if rounds:
            assert ledger.epsilon(name) == pytest.approx(_opacus(rounds), rel=1e-9)
    worst = max(seen.values())
    assert c.epsilon == pytest.approx(_opacus(worst), rel=1e-9)
    last = c.log[-1]
    assert last["epsilon"] == c.epsilon
    assert last["epsilon_clients"]["worst"] == c.epsilon
    assert last["epsilon_clients"]["clients"] == sum(1 for r in seen.values() if r)
    # the amplified figure (q = m / N) is only for observers of the released model, and is smaller
    assert last["epsilon_released_model"] < last["epsilon"]


def test_one_participation_is_at_least_the_unamplified_gaussian_mechanism() -> None:
    c = Coordinator(_job(), PARAMS)
    _run(c, 1)
    assert c.epsilon == pytest.approx(gaussian_epsilon(SIGMA, 1, DELTA), rel=1e-9)
    assert c.epsilon >= _opacus(1)


def test_budget_binds_the_worst_clients_epsilon() -> None:
    budget = _opacus(3) + 1e-6  # three participations fit, a fourth does not
    c = Coordinator(_job(epsilon_budget=budget), PARAMS)
    _run(c, 12)
    assert c.status == BUDGET_EXHAUSTED and "most-selected client" in c.reason
    assert max(c.client_ledger.participations.values()) == 3  # type: ignore[union-attr]
    assert c.epsilon <= budget


def test_participations_survive_a_resume(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = Coordinator(_job(), PARAMS, checkpoint=lambda co: store.save_state(tmp_path, co.state_dict()))
    _run(c, 3)
    d = Coordinator(_job(), PARAMS)
    d.load_state_dict(store.load_state(tmp_path))
    assert d.client_ledger.participations == c.client_ledger.participations  # type: ignore[union-attr]
    assert d.epsilon == c.epsilon


def test_ledger_distribution() -> None:
    ledger = ParticipationLedger(SIGMA, DELTA)
    assert ledger.worst() == 0.0 and ledger.distribution()["clients"] == 0
    ledger.record(["a", "b", "a"])  # one round: a counted once
    ledger.record(["a"])
    dist = ledger.distribution()
    assert dist["worst"] == pytest.approx(_opacus(2)) and dist["least"] == pytest.approx(_opacus(1))
    assert dist["most_participations"] == 2
    assert torch.isfinite(torch.tensor(dist["median"]))


def test_a_local_dp_fedsim_run_reports_at_least_one_participations_epsilon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """End to end (in-process fedsim): the printed epsilon is the per-client figure, q = 1."""
    import json

    from gradcomp.cli import main

    path = tmp_path / "fed.yaml"
    path.write_text(
        f"""
name: local-dp
task: digits-mlp
rounds: 2
clients: {{expected: 10}}
round: {{fraction: 0.3, min_clients: 2, deadline_seconds: 10}}
local: {{epochs: 1, batch_size: 32, lr: 0.1}}
compression: "rtopk(ratio=0.1, r=0.3) | ef"
privacy: {{mode: local, clip: 1.0, noise_multiplier: {SIGMA}, delta: {DELTA}}}
simulation: {{partition: iid, actors: 0}}
"""
    )
    assert main(["fedsim", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    res = json.loads((tmp_path / "runs" / "local-dp" / "results.json").read_text())
    one = gaussian_epsilon(SIGMA, 1, DELTA)
    assert res["epsilon"] >= one
    last = res["history"][-1]
    assert res["epsilon"] == last["epsilon"] == last["epsilon_clients"]["worst"]
    assert last["epsilon_released_model"] < one  # amplified: a different adversary, reported apart
