"""Robust aggregation: the median, trimmed-mean and norm-bounded strategies on hand-computed
examples, the weight-share cap, and the coordinator's per-update norm bound (attacks on the
whole round loop: test_robustness_attacks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_yaml

from gradcomp import metrics
from gradcomp.compression import Dense
from gradcomp.config.common import ConfigError, validate
from gradcomp.config.fed import FedJob, load_fed_job
from gradcomp.server.core import Coordinator
from gradcomp.strategies import ClientUpdate, strategy_for_job
from gradcomp.strategies.aggregate import capped_shares, coordinate_median, trimmed_mean
from gradcomp.strategies.central_dp import CentralDP
from gradcomp.strategies.krum import Krum, KrumConfig
from gradcomp.strategies.median import Median
from gradcomp.strategies.norm_bounded import NormBounded, NormBoundedConfig
from gradcomp.strategies.trimmed_mean import TrimmedMean, TrimmedMeanConfig


def _updates(*rows: list[float], examples: tuple[int, ...] | None = None) -> list[ClientUpdate]:
    counts = examples or (1,) * len(rows)
    return [ClientUpdate(f"c{i}", n, {"x": torch.tensor(r)}) for i, (r, n) in enumerate(zip(rows, counts, strict=True))]


def test_median_is_coordinate_wise() -> None:
    ups = _updates([1.0, 5.0, 2.0], [3.0, -1.0, 2.0], [100.0, 0.0, -7.0], examples=(1, 1, 10**6))
    torch.testing.assert_close(Median().aggregate(1, ups)["x"], torch.tensor([3.0, 0.0, 2.0]))
    even = coordinate_median([{"x": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 100.0)])
    torch.testing.assert_close(even["x"], torch.tensor([2.5]))  # mean of the middle two


def test_trimmed_mean_drops_each_end() -> None:
    ups = _updates([1.0], [2.0], [3.0], [4.0], [100.0])
    torch.testing.assert_close(TrimmedMean().aggregate(1, ups)["x"], torch.tensor([3.0]))  # trim 0.2 of 5: one
    torch.testing.assert_close(trimmed_mean([u.delta for u in ups], 0.0)["x"], torch.tensor([22.0]))
    three = [{"x": torch.tensor([v])} for v in (1.0, 2.0, 30.0)]
    torch.testing.assert_close(trimmed_mean(three, 0.2)["x"], torch.tensor([2.0]))  # ceil(0.6) = 1 each end
    torch.testing.assert_close(trimmed_mean(three, 0.0)["x"], torch.tensor([11.0]))
    ten = [{"x": torch.tensor([float(v)])} for v in (-50, 1, 2, 3, 4, 5, 6, 7, 8, 99)]
    torch.testing.assert_close(trimmed_mean(ten, 0.1)["x"], torch.tensor([4.5]))  # 0.1 * 10 is one, not two


def test_norm_bounded_clips_then_takes_the_weighted_mean() -> None:
    ups = _updates([3.0, 4.0], [0.0, 0.5], examples=(1, 3))
    out = NormBounded(NormBoundedConfig(clip=1.0)).aggregate(1, ups)["x"]
    torch.testing.assert_close(out, (torch.tensor([0.6, 0.8]) + 3 * torch.tensor([0.0, 0.5])) / 4)
    # no clip configured: the median norm of (5, 0.5, 2) = 2 bounds the round
    ups = _updates([3.0, 4.0], [0.0, 0.5], [0.0, 2.0])
    out = NormBounded().aggregate(1, ups)["x"]
    torch.testing.assert_close(
        out, (torch.tensor([1.2, 1.6]) + torch.tensor([0.0, 0.5]) + torch.tensor([0.0, 2.0])) / 3
    )


def test_capped_shares_water_fills() -> None:
    assert capped_shares([1, 1, 10**6], 0.5) == pytest.approx([0.25, 0.25, 0.5])
    assert capped_shares([1, 3, 6], 0.5) == pytest.approx([0.125, 0.375, 0.5])
    assert capped_shares([1, 5, 100], 0.45) == pytest.approx([0.1, 0.45, 0.45])  # capping one pushes another over
    assert capped_shares([1, 100], 0.5) == pytest.approx([0.5, 0.5])  # cannot be met: uniform
    assert capped_shares([2, 3, 5], 0.5) == pytest.approx([0.2, 0.3, 0.5])  # nothing above the cap: unchanged
    with pytest.raises(ValueError):
        capped_shares([], 0.5)


def _minimal_job(tmp_path: Path, data: dict[str, object]) -> FedJob:
    return load_fed_job(write_yaml(tmp_path / "fed.yaml", data))


def test_job_file_hyperparameters_reach_the_robust_strategies(tmp_path: Path) -> None:
    s = strategy_for_job(_minimal_job(tmp_path, {"strategy": {"name": "trimmed_mean", "trim": 0.3}}))
    assert isinstance(s, TrimmedMean) and s.config == TrimmedMeanConfig(trim=0.3)
    s = strategy_for_job(_minimal_job(tmp_path, {"strategy": {"name": "norm_bounded", "clip": 2.5}}))
    assert isinstance(s, NormBounded) and s.config.clip == 2.5 and s.config.server_lr == 1.0
    assert isinstance(strategy_for_job(_minimal_job(tmp_path, {"strategy": "median"})), Median)
    with pytest.raises(ConfigError, match="trim"):
        validate(FedJob, {"strategy": {"name": "median", "trim": 0.1}})
    with pytest.raises(ConfigError, match="trim"):
        validate(FedJob, {"strategy": {"name": "trimmed_mean", "trim": 0.5}})


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "norm_bounded", "krum"])
def test_central_dp_refuses_the_robust_aggregators(name: str) -> None:
    dp = {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="cannot be combined"):
        validate(FedJob, {"strategy": name, "privacy": dp})
    job = validate(FedJob, {"strategy": name})
    with pytest.raises(ValueError, match="central DP cannot wrap"):
        CentralDP(strategy_for_job(job), clip=1.0, noise_multiplier=1.0, expected_clients=3)


def _round(job: FedJob, sent: list[tuple[int, float]]) -> Coordinator:
    """One round of len(sent) clients on a 4-float model; each sends (num_examples, value everywhere)."""
    coord = Coordinator(job, {"x": torch.zeros(4)})
    names = [f"c{i}" for i in range(len(sent))]
    for n in names:
        coord.register(n)
    coord.select_clients()
    for n, (count, value) in zip(names, sent, strict=True):
        coord.accept_update(n, 1, count, {"x": Dense(torch.full((4,), value), (4,), torch.float32)})
    assert coord.finish_round() is not None
    return coord


@pytest.mark.parametrize("privacy", [{}, {"mode": "central", "clip": 100.0, "noise_multiplier": 0.0}])
def test_coordinator_bounds_every_update_norm(privacy: dict[str, object]) -> None:
    job = validate(
        FedJob,
        {
            "rounds": 1,
            "clients": {"expected": 3},
            "limits": {"max_update_norm": 2.0},
            "privacy": privacy or {"mode": "none"},
        },
    )
    before = metrics.value("gradcomp_fed_updates_clipped_total")
    coord = _round(job, [(10, 0.5), (10, 0.5), (10, 1e6)])  # norms 1, 1, 2e6
    assert metrics.value("gradcomp_fed_updates_clipped_total") - before == 1
    assert coord.log[-1]["clipped"] == 1
    # the outlier arrives as norm 2 (1.0 per coordinate); equal weights (central DP: / m = 3)
    torch.testing.assert_close(coord.params["x"], torch.full((4,), (0.5 + 0.5 + 1.0) / 3))


def test_coordinator_caps_a_clients_weight_share() -> None:
    job = validate(FedJob, {"rounds": 1, "clients": {"expected": 3}, "limits": {"max_examples": 10**6}})
    coord = _round(job, [(100, 1.0), (100, 1.0), (10**6, -1.0)])
    torch.testing.assert_close(coord.params["x"], torch.full((4,), 0.25 + 0.25 - 0.5))  # not ~ -1
    job = validate(FedJob, {"rounds": 1, "clients": {"expected": 3}, "limits": {"max_weight_share": 1.0}})
    coord = _round(job, [(100, 1.0), (100, 1.0), (200, -1.0)])
    torch.testing.assert_close(coord.params["x"], torch.zeros(4))  # cap off: the plain weighted mean


def test_defaults_refuse_a_million_examples() -> None:
    assert FedJob().limits.max_examples <= 10_000 and FedJob().limits.max_weight_share == 0.5
    assert FedJob().limits.max_update_norm == 10.0


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    ups = _updates([0.0], [1.0], [3.0], [4.5], [100.0])  # f = 1, n = 5: two neighbours each
    # scores: 0 -> 1 + 9 = 10, 1 -> 1 + 4 = 5, 3 -> 2.25 + 4 = 6.25, 4.5 -> 2.25 + 12.25 = 14.5, 100 -> huge
    torch.testing.assert_close(Krum().aggregate(1, ups)["x"], torch.tensor([1.0]))
    torch.testing.assert_close(Krum(KrumConfig(multi=3)).aggregate(1, ups)["x"], torch.tensor([4.0 / 3]))
