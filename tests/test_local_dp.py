"""Local client-level DP: the coordinator is the adversary, so each client's epsilon is the
Gaussian mechanism over its own participations at q = 1 (Opacus' accountant), reported as the
worst client with the distribution; the released-model figure is reported apart, labelled."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import SMALL_PARAMS as PARAMS
from conftest import dense_update
from opacus.accountants import RDPAccountant

from gradcomp.config.fed import FedJob
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import iid_shard
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.privacy import ParticipationLedger, gaussian_epsilon
from gradcomp.protocol.codec import serialize_model
from gradcomp.protocol.messages import PRIVATE_EXAMPLE_COUNT, training_config
from gradcomp.protocol.model import initial_params
from gradcomp.server import store
from gradcomp.server.core import BUDGET_EXHAUSTED, FAILED, Coordinator
from gradcomp.server.updates import Rejected

SIGMA, DELTA = 1.2, 1e-5


def _opacus(participations: int) -> float:
    acc = RDPAccountant()
    acc.history = [(SIGMA, 1.0, participations)]
    return float(acc.get_epsilon(delta=DELTA))


def _job(round: dict[str, object] | None = None, **privacy: object) -> FedJob:
    return FedJob.model_validate(
        {
            "rounds": 12,
            "clients": {"expected": 6, "min": 6},
            "round": round or {"fraction": 0.34, "min_clients": 2},  # 3 of 6 clients per round
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


def _released(q: float) -> float:
    acc = RDPAccountant()
    acc.history = [(SIGMA, q, 1)]
    return float(acc.get_epsilon(delta=DELTA))


def _deadline_passes(c: Coordinator, clock: Any) -> None:
    clock.t += 11.0
    c.touch_many([f"c{i}" for i in range(6)])
    c.finish_round()


def _open_with_one_report(c: Coordinator) -> list[str]:
    """Six clients connect, round 1 asks three, only the first of them reports."""
    for i in range(6):
        c.register(f"c{i}")
    first = c.select_clients()
    assert first is not None and len(first) == 3
    c.accept_update(first[0], 1, 5, dense_update(0.1))
    return first


def test_a_retry_charges_the_clients_that_missed_and_reads_their_late_updates(clock: Any) -> None:
    c = Coordinator(_job(round={"fraction": 0.34, "min_clients": 2, "deadline_seconds": 10}), PARAMS, clock=clock)
    first = _open_with_one_report(c)
    _deadline_passes(c, clock)  # retry: two of the three never asked
    r = c.current
    assert r is not None and r.attempt == 1
    again = sorted(r.selected - {first[0]})
    assert len(again) == 2 and not set(again) & set(first)
    with pytest.raises(Rejected) as late:  # a missed client's update, read and refused
        c.accept_update(first[1], 1, 5, dense_update(0.1))
    assert late.value.reason == "not_selected"
    for n in again:
        c.accept_update(n, 1, 5, dense_update(0.1))
    res = c.finish_round()
    assert res is not None
    ledger = c.client_ledger
    assert ledger is not None and ledger.participations == dict.fromkeys([*first, *again], 1)
    assert res.entry["epsilon"] == pytest.approx(_opacus(1), rel=1e-9)
    assert res.entry["epsilon_clients"]["clients"] == 5  # the three of the first draw, the two of the retry
    # released model: 1 - (1 - 3/6) (1 - 2/3) = 5/6 of the clients were asked, not the configured 3/6
    assert res.entry["sample_rate"] == pytest.approx(5 / 6)
    assert res.entry["epsilon_released_model"] == pytest.approx(_released(5 / 6), rel=1e-9)


def test_a_failed_round_charges_every_client_it_asked(clock: Any) -> None:
    job = _job(round={"fraction": 0.34, "min_clients": 2, "deadline_seconds": 10, "max_retries": 0})
    c = Coordinator(job, PARAMS, clock=clock)
    first = _open_with_one_report(c)
    _deadline_passes(c, clock)
    assert c.status == FAILED and c.log == []
    assert c.client_ledger is not None and c.client_ledger.participations == dict.fromkeys(first, 1)
    assert c.epsilon == pytest.approx(_opacus(1), rel=1e-9)


def test_resume_charges_the_interrupted_rounds_clients_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = Coordinator(_job(), PARAMS, checkpoint=lambda co: store.save_state(tmp_path, co.state_dict()))
    before = _run(c, 1)
    interrupted = c.select_clients()  # round 2 opens and persists its charge; one update arrives; crash
    assert interrupted is not None
    c.accept_update(interrupted[0], 2, 5, dense_update(0.1))
    d = Coordinator(_job(), PARAMS)
    d.load_state_dict(store.load_state(tmp_path))
    assert d.version == 1 and d.epsilon == c.epsilon
    assert d.client_ledger is not None and d.client_ledger.participations == c.client_ledger.participations  # type: ignore[union-attr]
    redone = _run(d, 1)  # round 2 again: a client asked both times released one update, charged once
    for n, rounds in before.items():
        asked = n in interrupted or redone[n] > 0
        assert d.client_ledger.participations.get(n, 0) == rounds + asked


@pytest.mark.parametrize("mode", ["local", "central"])
def test_a_local_dp_request_carries_no_true_example_count_or_loss(mode: str) -> None:
    """Local DP: the count and the loss would reach the coordinator (the adversary) without noise, so
    the request carries a constant count and no loss; central DP trusts the coordinator with both."""
    job = FedJob.model_validate(
        {
            "task": {"name": "digits-mlp", "args": {"hidden": 8}},
            "privacy": {"mode": mode, "clip": 1.0, "noise_multiplier": SIGMA, "delta": DELTA},
        }
    )
    rt = ClientRuntime(LocalTrainingConfig.from_pb(training_config(job)))
    rt.load_global(0, serialize_model(initial_params(rt.task, job.seed), 0))
    data = iid_shard(rt.task, 0, 4, job.seed)
    out = rt.train_round(client="c", round=1, model_version=0, data=data, memory=ClientMemory())
    assert out.num_examples == data.num_examples > PRIVATE_EXAMPLE_COUNT  # what the client itself knows
    sent = (out.request.num_examples, dict(out.request.metrics))
    if mode == "local":
        assert sent == (PRIVATE_EXAMPLE_COUNT, {})
    else:
        assert sent == (data.num_examples, {"train_loss": pytest.approx(out.train_loss)})


def test_local_dp_weighs_updates_equally_and_keeps_no_claimed_count_or_loss() -> None:
    """A client that still sends its count and loss: validated as ever, then neither is kept or logged."""
    c = Coordinator(_job(round={"fraction": 0.34, "min_clients": 2}), PARAMS)
    for i in range(6):
        c.register(f"c{i}")
    a, b, _ = c.select_clients() or []
    with pytest.raises(Rejected) as bad:
        c.accept_update(a, 1, 2**62, dense_update(1.0))
    assert bad.value.reason == "malformed" and "limits.max_examples" in str(bad.value)
    c.accept_update(a, 1, 1000, dense_update(0.1), {"train_loss": 0.25})
    c.accept_update(b, 1, 1, dense_update(0.2), {"train_loss": 0.75})
    res = c.finish_round(force=True)
    assert res is not None
    torch.testing.assert_close(c.params["b"], torch.full((3,), 0.15))  # equal weights, not 1000 : 1
    assert "examples" not in res.entry and "train_loss" not in res.entry


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
