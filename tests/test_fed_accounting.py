"""Federated privacy accounting: each released round is charged at the sampling rate the
coordinator really drew it at (clients asked over all attempts / the pool they were drawn from),
not the configured m / N; expected values come from Opacus' accountant directly."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import SMALL_PARAMS as PARAMS
from conftest import dense_update, fed_job
from opacus.accountants import RDPAccountant

from gradcomp.config.fed import FedJob
from gradcomp.server import store
from gradcomp.server.accounting import round_sample_rate
from gradcomp.server.core import BUDGET_EXHAUSTED, Coordinator

Z, DELTA = 1.0, 1e-5


def opacus_epsilon(*history: tuple[float, int]) -> float:
    """Opacus' RDP epsilon for rounds at (sampling rate, count), noise multiplier Z."""
    acc = RDPAccountant()
    acc.history = [(Z, q, n) for q, n in history]
    return float(acc.get_epsilon(delta=DELTA))


def central_job(expected: int, fraction: float, **kw: object) -> FedJob:
    privacy = {"mode": "central", "clip": 1.0, "noise_multiplier": Z, "delta": DELTA}
    privacy.update(kw.pop("privacy", {}))  # type: ignore[call-overload]
    spec = {"rounds": 50, "clients": {"expected": expected}, "round": {"fraction": fraction}, "privacy": privacy}
    return fed_job(spec, **kw)


def run_rounds(c: Coordinator, names: list[str], rounds: int) -> None:
    """Connect `names` and run `rounds` rounds in which every asked client reports."""
    for n in names:
        c.register(n, now=c.clock())
    for _ in range(rounds):
        chosen = c.select_clients()
        assert chosen
        for n in chosen:
            c.accept_update(n, c.version + 1, 5, dense_update())
        assert c.finish_round() is not None


def test_round_sample_rate_is_distinct_asked_over_the_pool_and_never_less() -> None:
    assert round_sample_rate([(10, 100)]) == 0.1
    assert round_sample_rate([(10, 10)]) == round_sample_rate([(7, 5)]) == 1.0  # pool not larger than the cohort
    assert round_sample_rate([(4, 10), (3, 6)]) == 0.7  # a retry from the clients not yet asked: 7 distinct / 10
    assert round_sample_rate([(4, 10), (3, 3)]) == 1.0  # the retry's pool shrank to its cohort
    assert round_sample_rate([(4, 10), (3, 5)]) > 0.7  # ... or below the first pool's rest: more than 7 / 10
    assert round_sample_rate([(4, 10), (0, 0)]) == 0.4  # a retry that found nobody to ask


def test_ten_connected_of_a_hundred_expected_is_charged_at_q_1() -> None:
    """The under-count this guards against: configured q = 10 / 100, but the 10 connected clients
    take part in every round."""
    c = Coordinator(central_job(100, 0.1), PARAMS)
    run_rounds(c, [f"c{i}" for i in range(10)], 20)
    assert c.epsilon == pytest.approx(opacus_epsilon((1.0, 20)), rel=1e-9)
    assert c.epsilon > 3 * opacus_epsilon((0.1, 20))  # what the configured rate printed (4.2 vs 30.1)
    assert {e["sample_rate"] for e in c.log} == {1.0}


def test_central_dp_below_q_1_is_charged_at_the_pool_each_round_drew_from(clock: Any) -> None:
    """m = 2 of N = 10 expected (configured 0.2): 5 connected give 0.4, then 20 connected give 0.1."""
    c = Coordinator(central_job(10, 0.2), PARAMS, clock=clock)
    run_rounds(c, [f"c{i}" for i in range(5)], 2)
    run_rounds(c, [f"c{i}" for i in range(20)], 3)
    assert [e["sample_rate"] for e in c.log] == [0.4, 0.4, 0.1, 0.1, 0.1]
    assert c.epsilon == pytest.approx(opacus_epsilon((0.4, 2), (0.1, 3)), rel=1e-9)
    assert c.log[-1]["epsilon"] == c.epsilon


def retried_round(c: Coordinator, clock: Any) -> list[str]:
    """10 clients, 4 asked, one reports, the deadline passes: a retry asks 3 of the 6 never asked."""
    names = [f"c{i}" for i in range(10)]
    for n in names:
        c.register(n)
    first = c.select_clients()
    assert first is not None and len(first) == 4
    c.accept_update(first[0], 1, 5, dense_update())
    clock.t = 11.0
    c.touch_many(names)
    assert c.finish_round() is None
    return first


def test_a_retry_charges_the_round_at_every_client_it_asked(clock: Any) -> None:
    job = central_job(10, 0.4, round={"fraction": 0.4, "min_clients": 3, "deadline_seconds": 10})
    c = Coordinator(job, PARAMS, clock=clock)
    first = retried_round(c, clock)
    r = c.current
    assert r is not None and r.attempt == 1 and not (r.selected - {first[0]}) & set(first)
    for n in sorted(r.selected - {first[0]}):
        c.accept_update(n, 1, 5, dense_update())
    res = c.finish_round()
    assert res is not None and res.entry["sample_rate"] == 0.7  # 7 distinct clients asked of 10
    assert c.epsilon == pytest.approx(opacus_epsilon((0.7, 1)), rel=1e-9)


def test_a_retry_that_would_pass_the_budget_stops_the_job_unreleased(clock: Any) -> None:
    budget = (opacus_epsilon((0.4, 1)) + opacus_epsilon((0.7, 1))) / 2  # the first draw fits, the retry does not
    job = central_job(
        10, 0.4, round={"fraction": 0.4, "min_clients": 3, "deadline_seconds": 10}, privacy={"epsilon_budget": budget}
    )
    c = Coordinator(job, PARAMS, clock=clock)
    retried_round(c, clock)
    assert c.status == BUDGET_EXHAUSTED and "retry" in c.reason and "0.7" in c.reason
    assert c.log == [] and c.epsilon == 0.0  # nothing was released, nothing charged


def test_the_budget_stop_uses_the_real_rate_not_the_configured_one() -> None:
    """Configured q = 0.1 would allow many rounds; at the real q = 1 the budget stops the job early."""
    budget = opacus_epsilon((1.0, 3)) + 1e-6
    c = Coordinator(central_job(100, 0.1, privacy={"epsilon_budget": budget}), PARAMS)
    names = [f"c{i}" for i in range(10)]
    for n in names:
        c.register(n)
    while c.select_clients():
        for n in names:
            c.accept_update(n, c.version + 1, 5, dense_update())
        c.finish_round()
    assert c.status == BUDGET_EXHAUSTED and c.version == 3 and c.epsilon <= budget


def test_resume_reports_the_same_epsilon_from_the_rate_history(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = Coordinator(central_job(10, 0.2), PARAMS, checkpoint=lambda co: store.save_state(tmp_path, co.state_dict()))
    run_rounds(c, [f"c{i}" for i in range(5)], 2)
    run_rounds(c, [f"c{i}" for i in range(10)], 1)
    d = Coordinator(central_job(10, 0.2), PARAMS)
    d.load_state_dict(store.load_state(tmp_path))
    assert d.epsilon == c.epsilon == pytest.approx(opacus_epsilon((0.4, 2), (0.2, 1)), rel=1e-9)


def as_format_2(path) -> None:  # type: ignore[no-untyped-def]
    """Rewrite a checkpoint as the older format (same body, format field 2, valid checksum)."""
    import hashlib

    from gradcomp._proto import checkpoint_pb2

    msg = checkpoint_pb2.Checkpoint()
    msg.ParseFromString(path.read_bytes()[len(store.MAGIC) + 32 :])
    msg.format = 2
    body = msg.SerializeToString()
    path.write_bytes(store.MAGIC + hashlib.sha256(body).digest() + body)


def test_a_format_2_checkpoint_is_migrated_to_upper_bounds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Format 2 charged m / N whatever the pool: its rounds are re-charged at q = 1, never less."""
    c = Coordinator(central_job(10, 0.2), PARAMS, checkpoint=lambda co: store.save_state(tmp_path, co.state_dict()))
    run_rounds(c, [f"c{i}" for i in range(10)], 2)
    as_format_2(tmp_path / store.FILENAME)
    d = Coordinator(central_job(10, 0.2), PARAMS)
    d.load_state_dict(store.load_state(tmp_path))
    assert d.epsilon == pytest.approx(opacus_epsilon((1.0, 2)), rel=1e-9) and d.epsilon > c.epsilon


def test_a_format_2_local_dp_checkpoint_charges_every_client_every_round(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Format 2 left out missed clients and interrupted rounds: each named client is migrated to one
    participation per round, and an unnamed entry to one more (a round a crash may have cut)."""
    job = FedJob.model_validate(
        {
            "clients": {"expected": 6},
            "round": {"fraction": 0.34},
            "privacy": {"mode": "local", "clip": 1.0, "noise_multiplier": Z, "delta": DELTA},
        }
    )
    c = Coordinator(job, PARAMS, checkpoint=lambda co: store.save_state(tmp_path, co.state_dict()))
    run_rounds(c, [f"c{i}" for i in range(6)], 2)
    as_format_2(tmp_path / store.FILENAME)
    d = Coordinator(job, PARAMS)
    d.load_state_dict(store.load_state(tmp_path))
    counts = d.client_ledger.participations  # type: ignore[union-attr]
    named = set(c.client_ledger.participations)  # type: ignore[union-attr]
    assert {counts[n] for n in named} == {2} and max(counts.values()) == 3 and len(counts) == len(named) + 1
    assert d.epsilon == pytest.approx(opacus_epsilon((1.0, 3)), rel=1e-9)
