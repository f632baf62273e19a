"""The round core without gRPC: update validation, rounds, privacy, persistence (strategies: test_strategies.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_PARAMS as PARAMS
from conftest import ManualClock, dense_update, fed_job

from gradcomp import metrics
from gradcomp.compression import Dense, build, to_fields
from gradcomp.compression.wire import Fields
from gradcomp.config.common import ConfigError, validate
from gradcomp.config.fed import FedJob
from gradcomp.protocol.model import model_spec
from gradcomp.server import store
from gradcomp.server.core import BUDGET_EXHAUSTED, FAILED, FINISHED, Coordinator
from gradcomp.server.updates import Rejected, decode_update


def job(**kw: object) -> FedJob:
    return fed_job({"rounds": 3, "clients": {"expected": 3, "min": 3}, "round": {"min_clients": 2}}, **kw)


# --- pure functions -------------------------------------------------------------------------
def test_decode_update_validates_each_rule() -> None:
    spec = model_spec(PARAMS)
    good = dense_update(0.5)
    out = decode_update(good, spec)
    assert out["w"].shape == (4, 3)
    with pytest.raises(Rejected) as e:
        decode_update(good, spec, max_bytes=10)
    assert e.value.reason == "too_large"
    with pytest.raises(Rejected) as e:
        decode_update({"w": good["w"]}, spec)
    assert e.value.reason == "malformed"
    bad_shape = dict(good, w=Dense(torch.zeros(12), (3, 4), torch.float32))
    with pytest.raises(Rejected) as e:
        decode_update(bad_shape, spec)
    assert e.value.reason == "bad_shape"
    bad_dtype = dict(good, b=Dense(torch.zeros(3, dtype=torch.float64), (3,), torch.float64))
    with pytest.raises(Rejected) as e:
        decode_update(bad_dtype, spec)
    assert e.value.reason == "bad_dtype"
    nan = dict(good, b=Dense(torch.tensor([0.0, float("nan"), 1.0]), (3,), torch.float32))
    with pytest.raises(Rejected) as e:
        decode_update(nan, spec)
    assert e.value.reason == "non_finite"
    f = to_fields(good["b"])
    short = Fields(f.kind, f.dtype, f.value_dtype, f.index_dtype, f.shape, f.values[:-2], f.indices)
    with pytest.raises(Rejected) as e:
        decode_update(dict(good, b=short), spec)
    assert e.value.reason == "malformed"


def test_decode_sparse_update_restores_dense() -> None:
    pipe = build("topk(ratio=0.25)")
    x = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    upd = {k: pipe.compress(v, key=k) for k, v in x.items()}
    out = decode_update(upd, model_spec(PARAMS))
    assert int((out["w"] != 0).sum()) == 3


# --- config ------------------------------------------------------------------------------------
def test_config_rejects_impossible_jobs() -> None:
    with pytest.raises(ConfigError, match="min_clients"):
        validate(FedJob, {"clients": {"expected": 2}, "round": {"fraction": 0.5, "min_clients": 2}})
    with pytest.raises(ConfigError, match="central"):
        validate(FedJob, {"privacy": {"mode": "central"}})
    with pytest.raises(ConfigError, match="dp stage"):
        validate(FedJob, {"compression": "dp(clip=1.0, sigma=1.0) | ef"})
    with pytest.raises(ConfigError, match="unknown key"):
        validate(FedJob, {"roundz": 3})
    j = validate(
        FedJob,
        {
            "compression": "rtopk(ratio=0.1, r=0.2) | ef",
            "privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0},
        },
    )
    assert j.client_spec().startswith("dp(clip=1.0, sigma=0.0) | rtopk")


# --- coordinator rounds -------------------------------------------------------------------------
def test_round_aggregates_when_all_report() -> None:
    clock = ManualClock()
    c = Coordinator(job(), PARAMS, clock=clock)
    for n in ("a", "b", "c"):
        c.register(n)
    assert c.select_clients() == ["a", "b", "c"]
    assert c.task_for("a").action == "train"
    c.accept_update("a", 1, 10, dense_update(1.0))
    c.accept_update("b", 1, 30, dense_update(2.0))
    assert c.finish_round() is None  # c still missing, deadline not reached
    c.accept_update("c", 1, 40, dense_update(0.0))  # half the round: at limits.max_weight_share, not above
    res = c.finish_round()
    assert res is not None and res.round == 1 and c.version == 1
    torch.testing.assert_close(c.params["b"], torch.full((3,), (10 * 1 + 30 * 2) / 80))
    assert c.task_for("a").action == "wait"


def test_rejections_do_not_disturb_round() -> None:
    clock = ManualClock()
    c = Coordinator(job(), PARAMS, clock=clock)
    for n in ("a", "b", "c"):
        c.register(n)
    c.select_clients()
    before = metrics.value("gradcomp_fed_updates_rejected_total", {"reason": "duplicate"})
    c.accept_update("a", 1, 10, dense_update(1.0))
    for name, rnd, upd, reason in [
        ("a", 1, dense_update(1.0), "duplicate"),
        ("b", 2, dense_update(1.0), "stale_round"),
        ("zz", 1, dense_update(1.0), "not_selected"),
        ("b", 1, {"w": dense_update(1.0)["w"]}, "malformed"),
    ]:
        with pytest.raises(Rejected) as e:
            c.accept_update(name, rnd, 10, upd)
        assert e.value.reason == reason
    assert metrics.value("gradcomp_fed_updates_rejected_total", {"reason": "duplicate"}) == before + 1
    c.accept_update("b", 1, 10, dense_update(3.0))  # b's bad attempt did not block its good one
    clock.t = 1000.0
    res = c.finish_round()
    assert res is not None and res.entry["clients"] == 2
    assert res.entry["rejected"] == {"duplicate": 1, "stale_round": 1, "not_selected": 1, "malformed": 1}


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"model_version": 7}, "trained on model v7; round 1 hands out v0"),
        ({"metrics_": {"train_loss": float("nan")}}, "'train_loss' is nan"),
        ({"metrics_": {"train_loss": float("inf")}}, "'train_loss' is inf"),
        ({"metrics_": {f"m{i}": 0.0 for i in range(17)}}, "at most 16 metrics"),
        ({"metrics_": {"x" * 65: 0.0}}, "1-64 characters"),
    ],
)
def test_a_wrong_model_version_or_bad_metrics_are_refused_without_touching_the_round(
    kwargs: dict[str, object], problem: str
) -> None:
    """Updates the coordinator used to accept: model_version was ignored (v999 for round 1 was
    counted); a NaN train_loss made the round log's mean NaN, in the checkpoint too; metric names were unbounded."""
    clock = ManualClock()
    c = Coordinator(job(), PARAMS, clock=clock)
    for n in ("a", "b", "c"):
        c.register(n)
    c.select_clients()
    with pytest.raises(Rejected, match=problem) as e:
        c.accept_update("a", 1, 10, dense_update(1.0), **kwargs)  # type: ignore[arg-type]
    assert e.value.reason == ("stale_round" if "model_version" in kwargs else "malformed")
    c.accept_update("a", 1, 10, dense_update(1.0), {"train_loss": 0.5}, model_version=0)  # its good one still counts
    c.accept_update("b", 1, 10, dense_update(3.0), {"train_loss": 1.5}, model_version=0)
    clock.t = 1000.0
    res = c.finish_round()
    assert res is not None and res.entry["clients"] == 2 and res.entry["train_loss"] == pytest.approx(1.0)


def test_an_inflated_example_count_cannot_take_over_the_average() -> None:
    clock = ManualClock()
    c = Coordinator(job(limits={"max_examples": 1000, "max_update_norm": 100.0}), PARAMS, clock=clock)
    for n in ("a", "b", "c"):
        c.register(n)
    c.select_clients()
    with pytest.raises(Rejected) as e:
        c.accept_update("a", 1, 2**62, dense_update(100.0))
    assert e.value.reason == "malformed" and "limits.max_examples" in str(e.value)
    c.accept_update("a", 1, 10, dense_update(1.0))  # the same client, honest this time
    c.accept_update("b", 1, 10, dense_update(3.0))
    clock.t = 1000.0  # c never reports: the deadline closes the round with a and b
    assert c.finish_round() is not None
    torch.testing.assert_close(c.params["b"], torch.full((3,), 2.0))


def test_deadline_retry_then_fail() -> None:
    clock = ManualClock()
    j = job(round={"min_clients": 2, "deadline_seconds": 10, "max_retries": 1})
    c = Coordinator(j, PARAMS, clock=clock)
    for n in ("a", "b", "c"):
        c.register(n)
    c.select_clients()
    c.accept_update("a", 1, 10, dense_update(1.0))
    clock.t = 11
    for n in ("a", "b", "c"):
        c.touch(n)
    assert c.finish_round() is None and c.current is not None and c.current.attempt == 1
    assert "a" in c.current.received  # kept across the retry
    clock.t = 22
    assert c.finish_round() is None
    assert c.status == FAILED and "round 1" in c.reason
    assert c.task_for("b").action == "done"


def test_force_and_finish_all_rounds() -> None:
    c = Coordinator(job(rounds=2), PARAMS)
    for n in ("a", "b", "c"):
        c.register(n)
    for r in (1, 2):
        c.select_clients()
        c.accept_update("a", r, 5, dense_update(1.0))
        assert c.finish_round(force=True) is not None
    assert c.status == FINISHED and [e["round"] for e in c.log] == [1, 2]


def test_budget_refuses_to_start_and_stops() -> None:
    priv = {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 0.01}
    with pytest.raises(ValueError, match="refusing to start"):
        Coordinator(job(privacy=priv), PARAMS)
    priv["epsilon_budget"] = 7.0  # enough for a few rounds at q=1, not for 50
    c = Coordinator(job(rounds=50, privacy=priv), PARAMS)
    for n in ("a", "b", "c"):
        c.register(n)
    rounds = 0
    while c.select_clients():
        for n in ("a", "b"):
            c.accept_update(n, c.version + 1, 5, dense_update(1.0))
        c.finish_round(force=True)
        rounds += 1
    assert c.status == BUDGET_EXHAUSTED and 0 < rounds < 50
    assert c.epsilon is not None and c.epsilon <= 7.0
    assert all("epsilon" in e for e in c.log)


def test_checkpoint_round_trip_resumes_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    j = job(
        strategy={"name": "fedadam", "server_lr": 0.1},
        privacy={"mode": "central", "clip": 1.0, "noise_multiplier": 0.5},
    )
    c = Coordinator(j, PARAMS, checkpoint=lambda co: store.save_state(tmp_path, co.state_dict()))
    for n in ("a", "b", "c"):
        c.register(n)
    c.select_clients()
    for n in ("a", "b", "c"):
        c.accept_update(n, 1, 5, dense_update(0.3))
    c.finish_round()
    d = Coordinator(j, PARAMS)
    d.load_state_dict(store.load_state(tmp_path))
    assert d.version == 1 and d.log == c.log and d.epsilon == pytest.approx(c.epsilon)
    torch.testing.assert_close(d.params["w"], c.params["w"])
    for co in (c, d):
        for n in ("a", "b", "c"):
            co.register(n)
        co.select_clients()
        for n in ("a", "b", "c"):
            co.accept_update(n, 2, 5, dense_update(0.3))
        co.finish_round()
    torch.testing.assert_close(d.params["w"], c.params["w"])  # same strategy state and noise stream


def test_connected_gauge_drops_clients_that_went_silent() -> None:
    """The gauge must follow the liveness window, not only join/leave: a silent client is not 'connected'."""
    from gradcomp import metrics

    clock = ManualClock()
    c = Coordinator(job(rounds=3, clients={"expected": 3, "min": 3}), PARAMS, clock=clock)
    for n in ("a", "b"):
        c.register(n)
    c.tick()
    assert metrics.value("gradcomp_fed_clients_connected") == 2
    clock.t = 3 * c.job.server.heartbeat_seconds + 1  # past the liveness window; only b is heard from
    c.touch("b")
    c.tick()
    assert metrics.value("gradcomp_fed_clients_connected") == 1


def test_connected_gauge_counts_a_silent_client_again_when_it_returns() -> None:
    """touch refreshes the gauge only on a liveness change; a returning client is such a change (no tick needed)."""
    from gradcomp import metrics

    clock = ManualClock()
    c = Coordinator(job(rounds=3, clients={"expected": 3, "min": 3}), PARAMS, clock=clock)
    c.touch_many(["a", "b", "c"])
    assert metrics.value("gradcomp_fed_clients_connected") == 3
    clock.t = 3 * c.job.server.heartbeat_seconds + 1  # a and b fall silent
    c.touch("c")
    c.tick()
    assert metrics.value("gradcomp_fed_clients_connected") == 1
    c.touch_many(["a", "b"])  # back, counted at once
    assert metrics.value("gradcomp_fed_clients_connected") == 3
    c.leave("b")
    c.touch("b")  # a client that left and calls again is back
    assert metrics.value("gradcomp_fed_clients_connected") == 3


def test_connected_gauge_is_counted_when_read_from_the_newest_coordinator() -> None:
    """No tick or heartbeat needed: a client that falls silent drops out at the next read; a
    dropped coordinator stops being counted (it is held weakly)."""
    import gc

    from gradcomp import metrics

    clock = ManualClock()
    old = Coordinator(job(rounds=3, clients={"expected": 2, "min": 2}), PARAMS, clock=clock)
    old.register("x")
    c = Coordinator(job(rounds=3, clients={"expected": 3, "min": 3}), PARAMS, clock=clock)
    c.touch_many(["a", "b"])
    assert metrics.value("gradcomp_fed_clients_connected") == 2  # c's clients, not old's
    clock.t = 3 * c.job.server.heartbeat_seconds + 1
    c.touch("b")
    assert metrics.value("gradcomp_fed_clients_connected") == 1
    del c
    gc.collect()
    assert metrics.value("gradcomp_fed_clients_connected") == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_in_every_float_dtype(dtype: torch.dtype, bad: float) -> None:
    """numpy checks float16/32/64, torch checks bfloat16 (numpy has no such dtype): both must refuse."""
    params = {"w": torch.zeros(4, 3, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}
    spec = model_spec(params)
    values = torch.tensor([0.0, bad, 1.0], dtype=dtype)
    update = {"w": Dense(torch.zeros(12, dtype=dtype), (4, 3), dtype), "b": Dense(values, (3,), dtype)}
    with pytest.raises(Rejected) as e:
        decode_update(update, spec)
    assert e.value.reason == "non_finite" and "'b'" in str(e.value)
    update["b"] = Dense(torch.ones(3, dtype=dtype), (3,), dtype)
    assert decode_update(update, spec)["b"].dtype == dtype


def test_shards_follow_known_names_then_join_order() -> None:
    """Known names take their sorted positions whatever the join order; unknown clients follow in join order."""
    j = job(rounds=3, clients={"expected": 2, "min": 1})
    c = Coordinator(j, PARAMS, clock=ManualClock(), client_names=["b", "a"])
    c.touch_many(["u1", "b"])
    c.register("u2")
    c.touch("a")
    got = {n: (i.shard_index, i.num_shards) for n, i in c.clients.items()}
    assert got == {"a": (0, 2), "b": (1, 2), "u1": (2, 3), "u2": (3, 4)}
