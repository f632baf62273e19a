"""Strategies: the registry and job-file section, each strategy's effective hyperparameters,
the server steps, the central-DP wrapper, and the pure aggregation functions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from gradcomp.compression import Dense
from gradcomp.config.common import ConfigError, validate
from gradcomp.config.fed import FedJob, load_fed_job
from gradcomp.server.core import Coordinator
from gradcomp.strategies import ClientUpdate, Strategy, build_strategy, strategy_class, strategy_for_job, strategy_names
from gradcomp.strategies.aggregate import clip_update, clipped_sum, weighted_average
from gradcomp.strategies.central_dp import CentralDP
from gradcomp.strategies.fedadam import FedAdam, FedAdamConfig
from gradcomp.strategies.fedavg import FedAvg, FedAvgConfig
from gradcomp.strategies.fedavgm import FedAvgM, FedAvgMConfig


def _minimal_job(tmp_path: Path, strategy: object) -> FedJob:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump({"strategy": strategy}))
    return load_fed_job(path)


# --- defaults come from one place ---------------------------------------------------------------
@pytest.mark.parametrize("name", strategy_names())
def test_minimal_job_gets_each_strategys_own_defaults(tmp_path: Path, name: str) -> None:
    built = strategy_for_job(_minimal_job(tmp_path, {"name": name}))
    cls = strategy_class(name)
    assert type(built) is cls and built.name == name
    assert built.config == cls.Config()  # every hyperparameter is the strategy's own default


def test_fedadam_minimal_job_uses_its_own_server_lr(tmp_path: Path) -> None:
    # Regression: the job model's server_lr default 1.0 used to override FedAdam's 0.01 (100x too high).
    strategy = strategy_for_job(_minimal_job(tmp_path, "fedadam"))
    assert strategy.config.server_lr == 0.01
    d = torch.tensor([1.0, -2.0])
    step = strategy.apply({"x": torch.zeros(2)}, {"x": d})["x"]
    m, v = 0.1 * d, 0.01 * d * d
    torch.testing.assert_close(step, 0.01 * m / (v.sqrt() + 1e-3))
    assert float(step.abs().max()) < 0.011


def test_job_file_values_reach_the_strategy(tmp_path: Path) -> None:
    s = strategy_for_job(_minimal_job(tmp_path, {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.3}))
    assert isinstance(s, FedAvgM) and (s.config.server_lr, s.config.momentum) == (0.5, 0.3)
    assert strategy_for_job(_minimal_job(tmp_path, {"server_lr": 0.7})).config == FedAvgConfig(server_lr=0.7)


def test_strategy_section_refuses_unknown_names_and_foreign_keys() -> None:
    with pytest.raises(ConfigError, match="fedadam"):
        validate(FedJob, {"strategy": {"name": "fedmagic"}})
    with pytest.raises(ConfigError, match="momentum"):
        validate(FedJob, {"strategy": {"name": "fedavg", "momentum": 0.9}})  # FedAvg has no momentum
    with pytest.raises(ConfigError, match="server_lr"):
        validate(FedJob, {"strategy": {"name": "fedadam", "server_lr": -1}})


# --- server steps ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy", [FedAvg(), FedAvgM(FedAvgMConfig(momentum=0.9)), FedAdam(FedAdamConfig(server_lr=0.1))]
)
def test_strategies_move_towards_delta_and_round_trip_state(strategy: Strategy) -> None:
    params = {"x": torch.zeros(3)}
    delta = {"x": torch.tensor([1.0, -1.0, 0.5])}
    p1 = strategy.apply(params, delta)
    assert torch.all(torch.sign(p1["x"]) == torch.sign(delta["x"]))
    twin = build_strategy(strategy.config)
    twin.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(twin.apply(p1, delta)["x"], strategy.apply(p1, delta)["x"])


def test_fedavgm_accumulates_momentum() -> None:
    s = FedAvgM(FedAvgMConfig(server_lr=1.0, momentum=0.5))
    p = s.apply({"x": torch.zeros(1)}, {"x": torch.ones(1)})
    p = s.apply(p, {"x": torch.ones(1)})
    assert float(p["x"]) == pytest.approx(1 + 1.5)


def test_fedadam_matches_the_adam_recursion() -> None:
    s = FedAdam(FedAdamConfig(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))
    d1, d2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    p = s.apply({"x": torch.zeros(2)}, {"x": d1})
    p = s.apply(p, {"x": d2})
    m1, v1 = 0.1 * d1, 0.01 * d1 * d1
    m2, v2 = 0.9 * m1 + 0.1 * d2, 0.99 * v1 + 0.01 * d2 * d2
    want = 0.1 * m1 / (v1.sqrt() + 1e-3) + 0.1 * m2 / (v2.sqrt() + 1e-3)
    torch.testing.assert_close(p["x"], want)
    torch.testing.assert_close(s.m["x"], m2)


# --- sampling and aggregation ---------------------------------------------------------------------
def test_configure_round_is_a_keyed_uniform_sample() -> None:
    key = bytes(range(32))
    s = FedAvg(key=key)
    pool = [f"c{i}" for i in range(20)]
    picked = s.configure_round(4, 0, pool, 5)
    assert len(picked) == 5 and set(picked) <= set(pool) and picked == sorted(picked)
    assert picked == FedAvg(key=key).configure_round(4, 0, list(reversed(pool)), 5)  # order of the pool is moot
    assert picked != s.configure_round(4, 1, pool, 5)  # a retry draws afresh
    assert s.configure_round(1, 0, pool[:2], 5) == pool[:2]
    # another key (a fresh one by default) samples otherwise: the sample is the key's, not the round's
    other = FedAvg()
    assert any(s.configure_round(r, 0, pool, 5) != other.configure_round(r, 0, pool, 5) for r in range(1, 6))


def test_default_aggregate_is_the_example_weighted_mean() -> None:
    ups = [ClientUpdate("a", 10, {"x": torch.ones(2)}), ClientUpdate("b", 30, {"x": torch.full((2,), 2.0)})]
    torch.testing.assert_close(FedAvg().aggregate(1, ups)["x"], torch.full((2,), 1.75))


class _MedianConfig(FedAvgConfig):
    name: Literal["test-median"] = "test-median"  # type: ignore[assignment]


class _Median(FedAvg):
    """What a robust aggregator looks like: its own aggregate, FedAvg's server step."""

    name = "test-median"
    Config = _MedianConfig  # type: ignore[assignment]

    def aggregate(self, round: int, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        keys = updates[0].delta
        return {k: torch.stack([u.delta[k] for u in updates]).median(dim=0).values for k in keys}


def test_a_robust_aggregate_plugs_into_the_coordinator() -> None:
    job = FedJob.model_validate({"rounds": 1, "clients": {"expected": 3}})
    coord = Coordinator(job, {"x": torch.zeros(1)})
    coord.strategy = _Median()
    for n in "abc":
        coord.register(n)
    coord.select_clients()
    for n, v in zip("abc", (1.0, 2.0, 1000.0), strict=True):
        coord.accept_update(n, 1, 1, {"x": Dense(torch.tensor([v]), (1,), torch.float32)})
    assert coord.finish_round() is not None
    assert float(coord.params["x"]) == 2.0  # the outlier did not move the model
    assert not _Median.aggregates_by_mean() and FedAdam.aggregates_by_mean()
    with pytest.raises(ValueError, match="central DP cannot wrap"):
        CentralDP(_Median(), clip=1.0, noise_multiplier=1.0, expected_clients=3)


# --- central DP wrapper ---------------------------------------------------------------------------
def test_central_dp_wraps_the_jobs_strategy(tmp_path: Path) -> None:
    job = validate(
        FedJob,
        {
            "clients": {"expected": 4},
            "strategy": {"name": "fedavgm", "momentum": 0.5},
            "privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 2.0},
        },
    )
    s = strategy_for_job(job)
    assert isinstance(s, CentralDP) and isinstance(s.inner, FedAvgM) and s.name == "fedavgm"
    assert (s.clip, s.noise_multiplier, s.expected_clients) == (1.0, 2.0, 4)
    assert s.configure_round(2, 0, list("abcd"), 2) == s.inner.configure_round(2, 0, list("abcd"), 2)


def test_central_dp_aggregate_fixed_denominator_and_noise() -> None:
    ups = [ClientUpdate(n, 7, {"x": torch.full((1000,), 10.0)}) for n in "ab"]
    quiet = CentralDP(FedAvg(), clip=1.0, noise_multiplier=0.0, expected_clients=4)
    # each update clipped to norm 1 (0.0316 per coord), summed (2x), divided by m=4, example counts ignored
    torch.testing.assert_close(quiet.aggregate(1, ups)["x"], torch.full((1000,), 2 * (1 / math.sqrt(1000)) / 4))
    key = bytes(32)
    noisy = CentralDP(FedAvg(), clip=1.0, noise_multiplier=2.0, expected_clients=4, noise_key=key)
    first = noisy.aggregate(1, ups)
    assert float((first["x"] - quiet.aggregate(1, ups)["x"]).std()) == pytest.approx(2.0 / 4, rel=0.1)
    twin = CentralDP(FedAvg(), clip=1.0, noise_multiplier=2.0, expected_clients=4, noise_key=key)
    torch.testing.assert_close(twin.aggregate(2, ups)["x"], noisy.aggregate(2, ups)["x"])  # same key: same noise
    stranger = CentralDP(FedAvg(), clip=1.0, noise_multiplier=2.0, expected_clients=4)
    assert not torch.equal(stranger.aggregate(2, ups)["x"], noisy.aggregate(2, ups)["x"])


def test_central_dp_refuses_a_non_mean_strategy_at_load_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FedAvgM, "aggregate", _Median.aggregate)
    with pytest.raises(ConfigError, match="cannot be combined"):
        validate(
            FedJob,
            {"strategy": "fedavgm", "privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0}},
        )


# --- pure functions -------------------------------------------------------------------------------
def test_weighted_average_weights_by_examples() -> None:
    a, b = {"x": torch.ones(2)}, {"x": torch.full((2,), 4.0)}
    out = weighted_average([(1.0, a), (3.0, b)])
    torch.testing.assert_close(out["x"], torch.full((2,), 3.25))
    with pytest.raises(ValueError):
        weighted_average([])


def test_clip_update_bounds_global_norm() -> None:
    u = {"a": torch.full((4,), 3.0), "b": torch.full((9,), 4.0)}
    clipped, norm = clip_update(u, 1.0)
    assert norm == pytest.approx(math.sqrt(4 * 9 + 9 * 16))
    total = math.sqrt(sum(float((v**2).sum()) for v in clipped.values()))
    assert total == pytest.approx(1.0, rel=1e-5)
    same, _ = clip_update({"a": torch.full((1,), 0.5)}, 1.0)
    assert float(same["a"]) == 0.5
    torch.testing.assert_close(clipped_sum([u, u], 1.0)["a"], 2 * clipped["a"])
