"""TrainJob validation: the shipped examples load, bad input fails naming the key."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from torch import nn

from gradcomp.compression import SpecError
from gradcomp.config.common import ConfigError, validate
from gradcomp.config.train import TrainJob
from gradcomp.worker.dp import linear_aggregation
from gradcomp.worker.hook import CompressionState
from gradcomp.worker.launch import describe, load_train_job
from gradcomp.worker.loop import shard_indices
from gradcomp.worker.schedule import lr_schedule

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["digits-dense", "digits-rtopk", "digits-dp"])
def test_examples_load(name: str) -> None:
    job = load_train_job(str(EXAMPLES / f"{name}.yaml"))
    assert job.name == name
    info = describe(job)
    assert info["steps_per_epoch"] >= 1 and info["parameters"] > 1000


def test_spec_list_and_string_are_normalised() -> None:
    a = validate(TrainJob, {"name": "a", "compression": ["rtopk(ratio=0.01, r=0.05)", "ef"]})
    b = validate(TrainJob, {"name": "a", "compression": "rtopk(0.01, 0.05) | ef"})
    assert a.compression == b.compression == "rtopk(ratio=0.01, r=0.05) | ef"
    assert validate(TrainJob, {"name": "a", "task": "digits-cnn"}).task.name == "digits-cnn"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"name": "x", "compression": "topk(ratio=0.01) | dp(clip=1, sigma=1)"}, "compression"),
        ({"name": "x", "compression": "zip(3)"}, "unknown stage"),
        ({"name": "x", "optimizer": {"name": "rmsprop"}}, "optimizer.name"),
        ({"name": "x", "epochs": 0}, "epochs"),
        ({"name": "x", "bogus": 1}, "bogus: unknown key"),
        ({"name": "x", "task": "nope"}, "unknown task"),
        ({"name": "../etc", "epochs": 1}, "name"),
        ({"name": "x", "dp": {"delta": 2}}, "dp.delta"),
        ({"name": "x", "schedule": {"name": "exp"}}, "schedule.name"),
        ({"name": "x", "dp": {}, "compression": "dp(clip=1, sigma=1)"}, "use the job's 'dp' section"),
        (
            {"name": "x", "compression": "dp(clip=1, sigma=1) | rtopk(ratio=0.01, r=0.05)"},
            "noise from the job's public seed",
        ),
        ({"epochs": 1}, "name"),
    ],
)
def test_bad_jobs_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match="invalid job file") as err:
        validate(TrainJob, data)
    assert needle in str(err.value)


def test_ddp_hook_refuses_a_dp_stage() -> None:
    """Its generator is seeded from the job's public seed: anyone with the job file could subtract the noise."""
    with pytest.raises(SpecError, match="job's public seed"):
        CompressionState.for_model(nn.Linear(3, 2), "randomk(ratio=0.5) | dp(clip=1.0, sigma=1.0) | ef")


def test_overrides_and_workers(tmp_path: Path) -> None:
    job = load_train_job(str(EXAMPLES / "digits-rtopk.yaml"), ["epochs=2", "optimizer.lr=0.2"], workers=3)
    assert (job.epochs, job.optimizer.lr, job.scaling.num_workers) == (2, 0.2, 3)
    with pytest.raises(ConfigError, match="--workers 0"):
        load_train_job(str(EXAMPLES / "digits-rtopk.yaml"), workers=0)


def test_batch_too_large_for_the_data_fails_early() -> None:
    job = validate(TrainJob, {"name": "x", "batch_size": 1000})
    with pytest.raises(ConfigError, match="training examples"):
        describe(job)


def test_even_shards_cover_disjoint_equal_parts() -> None:
    shards = [shard_indices(1437, r, 4, seed=0, epoch=3) for r in range(4)]
    assert {len(s) for s in shards} == {1437 // 4}
    assert len(set().union(*[set(s.tolist()) for s in shards])) == 4 * (1437 // 4)
    assert not shards[0].equal(shard_indices(1437, 0, 4, seed=0, epoch=4))


def test_schedules() -> None:
    job = validate(TrainJob, {"name": "x", "epochs": 4, "schedule": {"name": "cosine", "warmup_steps": 10}})
    f = lr_schedule(job, steps_per_epoch=25)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(99) < 0.01
    job = validate(TrainJob, {"name": "x", "schedule": {"name": "step", "step_epochs": 2, "gamma": 0.5}})
    f = lr_schedule(job, steps_per_epoch=10)
    assert [f(s) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]


def _factors(schedule: dict, epochs: int = 4, steps_per_epoch: int = 25) -> list[float]:
    job = validate(TrainJob, {"name": "x", "epochs": epochs, "optimizer": {"lr": 0.1}, "schedule": schedule})
    f = lr_schedule(job, steps_per_epoch=steps_per_epoch)
    return [f(s) for s in range(epochs * steps_per_epoch)]


def test_sigmoid_schedule_warms_up_then_decays_around_its_midpoint() -> None:
    f = _factors({"name": "sigmoid", "warmup_steps": 10, "midpoint": 0.5, "steepness": 10})
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to lr
    decay = f[10:]  # progress 0..1 over the 90 steps after the warm-up
    assert decay[0] == pytest.approx(1.0)  # normalised: starts exactly at lr
    assert all(a >= b for a, b in itertools.pairwise(decay))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    for step in (0, 22, 45, 67, 89):  # lr * (1 - sigmoid(k (p - m))) / (1 - sigmoid(-k m))
        p = min(step, 90) / 90
        assert decay[step] == pytest.approx((1 - sig(10 * (p - 0.5))) / (1 - sig(-5)), rel=1e-9)
    assert decay[45] == pytest.approx(0.5 / sig(5), rel=1e-9)  # the midpoint: about half the rate
    # flat early, steep in the middle: above the cosine a quarter in, far below it three quarters in
    cos = _factors({"name": "cosine", "warmup_steps": 10})[10:]
    assert decay[22] > cos[22] + 0.05 and decay[67] < cos[67] - 0.05 and decay[-1] < 0.01
    sharper = _factors({"name": "sigmoid", "warmup_steps": 10, "steepness": 30})[10:]
    assert sharper[22] > decay[22] and sharper[67] < decay[67]
    later = _factors({"name": "sigmoid", "midpoint": 0.8})
    assert later[50] > 0.95 and later[80] == pytest.approx(0.5 / sig(8), rel=1e-9)


def test_sigmoid_schedule_floor_and_bad_settings() -> None:
    f = _factors({"name": "sigmoid", "min_lr": 0.01})
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=0.01) and min(f) >= 0.1
    for bad in ({"midpoint": 0}, {"midpoint": 1.0}, {"steepness": 0}):
        with pytest.raises(ConfigError):
            validate(TrainJob, {"name": "x", "schedule": {"name": "sigmoid", **bad}})
    with pytest.raises(ConfigError, match="sigmoid schedule would raise"):
        validate(TrainJob, {"name": "x", "optimizer": {"lr": 0.1}, "schedule": {"name": "sigmoid", "min_lr": 0.5}})


def test_step_schedule_shape() -> None:
    f = _factors({"name": "step", "step_epochs": 1, "gamma": 0.5, "warmup_steps": 5}, epochs=3, steps_per_epoch=10)
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5:10] == [1.0] * 5 and f[10:20] == [0.5] * 10 and f[20:] == [0.25] * 10


def test_noise_placement_follows_linearity() -> None:
    from gradcomp.compression import build

    assert linear_aggregation(build("none"))
    assert linear_aggregation(build("randomk(ratio=0.1, seed=1) | ef"))
    assert not linear_aggregation(build("rtopk(ratio=0.01, r=0.05) | ef"))
    assert not linear_aggregation(build("unit"))


def test_cosine_schedule_must_decay(tmp_path: Path) -> None:
    from gradcomp.config.common import ConfigError, load_job
    from gradcomp.config.train import TrainJob

    path = tmp_path / "job.yaml"
    path.write_text("name: j\noptimizer: {name: sgd, lr: 0.1}\nschedule: {name: cosine, min_lr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"schedule.min_lr \(0.5\) is above optimizer.lr \(0.1\)"):
        load_job(TrainJob, path)
