"""Liveness on the real round core, against a client that stays connected but never delivers:
a client that heartbeats but never submits gets benched and cannot fail the job; the connected
gauge follows the liveness window. Driven in-process with an injected clock (no sleeping)."""

from __future__ import annotations

import pytest
from conftest import SMALL_PARAMS as PARAMS
from conftest import ManualClock, dense_update

from gradcomp import metrics
from gradcomp.config.fed import FedJob
from gradcomp.server import store
from gradcomp.server.core import FINISHED, Coordinator
from gradcomp.server.liveness import Bench, prefer

HONEST, SILENT = ("a", "b", "c"), "s"


def silent_job(rounds: int = 12, seed: int = 3, **round_: object) -> FedJob:
    """clients_per_round == min_clients == 2 among 4 clients, one retry per round: the set-up in
    which one silent client used to fail every round."""
    return FedJob.model_validate(
        {
            "rounds": rounds,
            "seed": seed,
            "clients": {"expected": 4, "min": 4},
            "round": {"fraction": 0.5, "min_clients": 2, "deadline_seconds": 5, "max_retries": 1, **round_},
            "server": {"heartbeat_seconds": 1},
        }
    )


def drive(coord: Coordinator, clock: ManualClock, steps: int) -> dict[tuple[int, int], set[str]]:
    """Honest clients pull and submit; the silent one only heartbeats. Returns who each (round, attempt) asked."""
    selections: dict[tuple[int, int], set[str]] = {}
    for _ in range(steps):
        if coord.done:
            break
        coord.tick()
        if coord.current is not None:
            selections[coord.current.number, coord.current.attempt] = set(coord.current.selected)
        coord.touch(SILENT)
        for name in HONEST:
            task = coord.task_for(name)
            if task.action == "train":
                coord.accept_update(name, task.round, 10, dense_update())
        clock.t += 1
    return selections


def silent_in_round_one(coord: Coordinator, clock: ManualClock) -> None:
    """Put the silent client into round 1 (whatever the seeded sample chose) with "a", which delivers;
    then pass the deadline."""
    for name in (*HONEST, SILENT):
        coord.register(name)
    coord.select_clients()
    assert coord.current is not None
    coord.current.selected = {"a", SILENT}
    coord.accept_update("a", 1, 10, dense_update())
    clock.t = 6


def connected_gauge() -> float | None:
    return metrics.REGISTRY.get_sample_value("gradcomp_fed_clients_connected")


def test_a_client_that_heartbeats_but_never_submits_cannot_fail_the_job() -> None:
    clock = ManualClock()
    coord = Coordinator(silent_job(), PARAMS, clock=clock)
    for name in (*HONEST, SILENT):
        coord.register(name)
    selections = drive(coord, clock, steps=400)
    assert coord.status == FINISHED, coord.reason
    assert [e["round"] for e in coord.log] == list(range(1, 13))
    benched = [e["round"] for e in coord.log if SILENT in e.get("benched", [])]
    assert benched, "the silent client was never benched"
    # after two missed rounds it sits out round.bench_rounds (5) rounds, and no retry asks it again
    asked = sorted(number for (number, _), chosen in selections.items() if SILENT in chosen)
    assert not [n for n in asked if benched[0] < n <= benched[0] + 5]
    assert all(attempt == 0 for (_, attempt), chosen in selections.items() if SILENT in chosen)
    assert len(asked) <= 2 * (len(benched) + 1)


@pytest.mark.parametrize("seed", range(4))
def test_a_retry_never_asks_a_client_that_already_missed_the_round(seed: int) -> None:
    clock = ManualClock()
    coord = Coordinator(silent_job(rounds=1, seed=seed), PARAMS, clock=clock)
    silent_in_round_one(coord, clock)
    for name in ("a", "b", SILENT):  # c has gone quiet: the retry chooses between b and the silent client
        coord.touch(name)
    assert coord.finish_round() is None and coord.current is not None and coord.current.attempt == 1
    assert coord.current.selected == {"a", "b"}
    coord.accept_update("b", 1, 10, dense_update())
    result = coord.finish_round()
    assert result is not None and coord.status == FINISHED


def test_bench_state_survives_resume(tmp_path) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    job = silent_job(rounds=20, bench_after_misses=1)
    coord = Coordinator(job, PARAMS, clock=clock, checkpoint=lambda c: store.save_state(tmp_path, c.state_dict()))
    silent_in_round_one(coord, clock)
    coord.finish_round(force=True)
    assert coord.log[-1]["benched"] == [SILENT] and coord.bench.benched(2) == {SILENT}
    resumed = Coordinator(job, PARAMS, clock=clock)
    resumed.load_state_dict(store.load_state(tmp_path))
    assert resumed.bench.state_dict() == coord.bench.state_dict()
    for name in (*HONEST, SILENT):
        resumed.register(name)
    for _ in range(5):  # rounds 2..6: benched, never offered
        chosen = resumed.select_clients()
        assert chosen is not None and SILENT not in chosen
        for name in chosen:
            resumed.accept_update(name, resumed.version + 1, 10, dense_update())
        resumed.finish_round()
    assert resumed.bench.benched(resumed.version + 1) == set()


def test_benching_never_keeps_a_round_from_opening() -> None:
    assert prefer(["a", "b", "s"], {"s"}, 2) == ["a", "b"]
    assert prefer(["a", "s"], {"s"}, 2) == ["a", "s"]  # without it the round could not open at all
    bench = Bench(after_misses=2, rounds=3)
    assert bench.record(1, {"s", "a"}, {"a"}) == []
    assert bench.record(2, {"s"}, set()) == ["s"] and bench.benched(3) == {"s"} and bench.benched(6) == set()
    assert bench.record(3, {"s", "a"}, {"s", "a"}) == [] and bench.misses == {}  # delivering resets the count
    assert Bench(after_misses=1, rounds=0).record(1, {"s"}, set()) == []  # bench_rounds 0 turns it off


def test_connected_gauge_drops_when_a_client_goes_silent() -> None:
    clock = ManualClock()
    job = FedJob.model_validate(
        {"rounds": 1, "clients": {"expected": 3, "min": 3}, "server": {"heartbeat_seconds": 1, "liveness_seconds": 3}}
    )
    coord = Coordinator(job, PARAMS, clock=clock)
    for name in ("a", "b", "c"):
        coord.register(name)
    assert connected_gauge() == 3
    clock.t = 2
    coord.touch("a")  # heartbeat
    coord.task_for("b")  # pull
    clock.t = 4  # c last heard from at 0: outside the 3 s window
    coord.tick()
    assert connected_gauge() == 2 and coord.connected() == ["a", "b"]
    clock.t = 5
    coord.touch("c")  # c is back: heard from again
    assert connected_gauge() == 3
    clock.t = 6  # a and b last heard from at 2
    coord.tick()
    assert connected_gauge() == 1 and coord.connected() == ["c"]
