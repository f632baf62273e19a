"""TrainJob validation: the shipped examples load, bad input fails naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from gradcomp.compression import SpecError
from gradcomp.config.common import ConfigError, validate
from gradcomp.config.train import TrainJob
from gradcomp.worker.dp import linear_aggregation
from gradcomp.worker.hook import CompressionState
from gradcomp.worker.launch import describe, load_train_job
from gradcomp.worker.loop import _schedule, shard_indices

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
    f = _schedule(job, steps_per_epoch=25)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(99) < 0.01
    job = validate(TrainJob, {"name": "x", "schedule": {"name": "step", "step_epochs": 2, "gamma": 0.5}})
    f = _schedule(job, steps_per_epoch=10)
    assert [f(s) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]


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
