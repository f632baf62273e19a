"""The simulation's public timing hook: every part of a round reports into it, and unset it changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_yaml

from gradcomp.sim.setup import build_simulation, load_fedsim_job
from gradcomp.sim.timing import NO_TIMINGS, PARTS, Timings

ROUNDS = 3


def _job(tmp_path: Path, vectorize: str) -> Path:
    data = {
        "name": f"timing-{vectorize}",
        "task": {"name": "digits-mlp"},
        "rounds": ROUNDS,
        "clients": {"expected": 20},
        "round": {"fraction": 0.25, "min_clients": 1},
        "local": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        "compression": "topk(ratio=0.1) | ef",
        "simulation": {"partition": "iid", "actors": 0, "vectorize": vectorize},
    }
    return write_yaml(tmp_path / f"{vectorize}.yaml", data)


@pytest.mark.parametrize("vectorize", ["on", "off"])
def test_every_part_reports(tmp_path: Path, vectorize: str) -> None:
    timings = Timings()
    sim, _ = build_simulation(load_fedsim_job(_job(tmp_path, vectorize)), quiet=True, timings=timings)
    sim.run()
    trained = sim.updates_trained
    assert trained > 0
    assert timings.calls["pool call"] == ROUNDS  # one training call per round (no retries here)
    assert timings.calls["accept updates"] == trained  # every update is handed to the coordinator
    assert timings.calls["build requests"] == trained  # one request built per trained client
    assert timings.calls["close round"] >= ROUNDS
    if vectorize == "on":
        assert timings.calls["schedules"] >= ROUNDS
        assert timings.calls["steps"] >= ROUNDS * 2  # 5 clients x ~90 examples / batch 10: several steps
    else:  # clients train one at a time: no cohort steps or schedules
        assert timings.calls["steps"] == timings.calls["schedules"] == 0
    assert set(timings.seconds) <= set(PARTS)
    assert all(s > 0 for s in timings.seconds.values())
    # the training call contains the requests it builds
    assert timings.seconds["pool call"] >= timings.seconds["build requests"]


def test_unset_and_reset_change_nothing(tmp_path: Path) -> None:
    timed, plain = Timings(), None
    for t in (timed, NO_TIMINGS):
        sim, _ = build_simulation(load_fedsim_job(_job(tmp_path, "on")), quiet=True, timings=t)
        sim.run()
        if plain is None:
            plain = sim.coord.params
        else:  # the same model whether or not the parts were timed
            for k, v in sim.coord.params.items():
                torch.testing.assert_close(v, plain[k], rtol=0, atol=0)
    assert not NO_TIMINGS.seconds and not NO_TIMINGS.calls  # the default records nothing
    timed.reset()
    assert not timed.seconds and not timed.calls


def test_wrap_and_part_count_calls() -> None:
    t = Timings()
    double = t.wrap("steps", lambda x: 2 * x)
    assert [double(i) for i in range(3)] == [0, 2, 4]
    with pytest.raises(RuntimeError), t.part("close round"):
        raise RuntimeError("a part that fails is still counted")
    assert t.calls == {"steps": 3, "close round": 1}
    assert NO_TIMINGS.wrap("steps", len) is len  # unset: the hot loop calls the function itself
