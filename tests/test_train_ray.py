"""`gradcomp train` end to end on a local Ray: 2 Ray Train workers, DDP + compression hook.

Kept short (few epochs of the digits MLP); all tests share one local Ray instance.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradcomp import metrics
from gradcomp.cli import main
from gradcomp.raycluster import connect
from gradcomp.worker.launch import describe, load_train_job, train
from gradcomp.worker.train_metrics import TrainMetrics

pytestmark = pytest.mark.ray

JOB: dict[str, Any] = {
    "task": "digits-mlp",
    "seed": 0,
    "batch_size": 16,
    "optimizer": {"name": "momentum", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_steps": 20},
    "compression": "rtopk(ratio=0.01, r=0.05) | ef",
    "scaling": {"num_workers": 2},
    "checkpoint": {"every_epochs": 1, "keep": 2},
    "max_failures": 1,
}


@dataclass(frozen=True)
class KillRank1:
    """A `before_step` fault: rank 1 exits at `step` once (the marker file says it already did).

    Ray Train's controller collects reports when it polls (every ~2 s, later on a loaded machine),
    and a crash before it registered the last checkpoint would lose it: so rank 1 first waits
    until the controller's snapshot in the run directory lists a checkpoint (a condition, not a
    fixed delay), for at most `wait_s`. Without a snapshot it exits at once.
    """

    step: int
    marker: Path
    snapshot: Path | None = None
    wait_s: float = 120.0

    def __call__(self, global_step: int, rank: int) -> None:
        if rank != 1 or global_step != self.step or self.marker.exists():
            return
        self.marker.write_text(f"rank {rank} exited at step {global_step}\n")
        deadline = time.monotonic() + self.wait_s
        while self.snapshot and not _lists_a_checkpoint(self.snapshot) and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(17)


def _lists_a_checkpoint(snapshot: Path) -> bool:
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    import ray
    import ray.cloudpickle

    connect(num_cpus=2, log_to_driver=False)
    # Ray workers cannot import this test module: KillRank1 travels by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def _train_with_fault(job_path: Path, runs: Path, fault: KillRank1) -> dict[str, Any]:
    """What `gradcomp train JOB --runs-dir RUNS` does, with a fault injected into the workers."""
    job = load_train_job(str(job_path))
    observe = TrainMetrics(job.name, job.scaling.num_workers, job.batch_size).observe  # as --metrics-port does
    return train(job, runs / job.name, describe(job), before_step=fault, observe=observe)


def _write_job(tmp_path: Path, name: str, **changes: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**JOB, "name": name, **changes}))
    return path


def _results(runs: Path, name: str) -> dict[str, Any]:
    return json.loads((runs / name / "results.json").read_text())


@pytest.fixture(scope="module")
def crashed_run(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 6-epoch rtopk+ef run in which rank 1 dies in epoch 2, after the epoch-1 checkpoint.

    Shared by the accuracy and the recovery tests: every worker-group start costs tens of
    seconds on a small machine.
    """
    tmp = tmp_path_factory.mktemp("ray")
    runs, marker = tmp / "runs", tmp / "crashed-once"
    job = _write_job(tmp, "crash", epochs=6)
    snapshot = runs / "crash" / "checkpoint_manager_snapshot.json"  # Ray Train's record of checkpoints
    results = _train_with_fault(job, runs, KillRank1(step=60, marker=marker, snapshot=snapshot))  # 44 steps per epoch
    return {"results": results, "runs": runs, "job": job, "marker": marker, "on_disk": _results(runs, "crash")}


def test_rtopk_ef_trains_digits_well_above_chance(crashed_run: dict[str, Any]) -> None:
    res = crashed_run["results"]
    assert res == crashed_run["on_disk"]
    assert res["final"]["status"] == "finished"
    assert res["final"]["test_accuracy"] > 0.8  # chance is 0.1
    # 1% of the values plus their int32 indices: ~50x fewer bytes than dense float32.
    assert res["dense_bytes"] / res["bytes_sent"] > 30
    steps = [json.loads(line) for line in (crashed_run["runs"] / "crash" / "steps.jsonl").read_text().splitlines()]
    assert all(s["compression_ratio"] > 30 for s in steps)
    assert {s["step"] for s in steps} == set(range(1, 6 * 44 + 1))


def test_training_metrics_follow_the_run(crashed_run: dict[str, Any]) -> None:
    """The driver's Prometheus metrics saw every rank's steps, the restore and the evaluations."""
    final, run = crashed_run["results"]["final"], {"run": "crash"}
    assert metrics.value("gradcomp_train_restores_total", run) == final["restores"] == 1
    assert metrics.value("gradcomp_train_test_accuracy", run) == final["test_accuracy"]
    assert metrics.value("gradcomp_train_epoch", run) == 6
    for rank in ("0", "1"):  # steps replayed after the restore were sent again, so they count again
        labels = {**run, "rank": rank}
        assert metrics.value("gradcomp_train_steps_total", labels) >= 6 * 44
        sent = metrics.value("gradcomp_train_bytes_sent_total", labels)
        assert metrics.value("gradcomp_train_dense_bytes_total", labels) / sent > 30
    assert metrics.REGISTRY.get_sample_value("gradcomp_train_privacy_epsilon", run) is None  # no DP


def test_worker_killed_mid_run_resumes_from_checkpoint(crashed_run: dict[str, Any]) -> None:
    res = crashed_run["results"]
    assert crashed_run["marker"].is_file(), "the fault was not injected"
    assert res["final"]["restores"] == 1
    # Epoch 2 was replayed from the epoch-1 checkpoint; the history holds each epoch once.
    assert [h["epoch"] for h in res["history"]] == list(range(1, 7))
    assert res["final"]["step"] == 6 * 44


def test_rerun_with_same_name_continues(crashed_run: dict[str, Any]) -> None:
    runs, job = crashed_run["runs"], crashed_run["job"]
    first = crashed_run["results"]["history"]
    assert main(["train", str(job), "--runs-dir", str(runs), "--set", "epochs=7"]) == 0
    res = _results(runs, "crash")
    assert [h["epoch"] for h in res["history"]] == list(range(1, 8))
    assert res["history"][:6] == first
    assert res["final"]["step"] == 7 * 44
    steps = [json.loads(line) for line in (runs / "crash" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps[-44:]] == list(range(6 * 44 + 1, 7 * 44 + 1))


def test_changed_job_under_same_name_is_refused(local_ray: None, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "same").mkdir(parents=True)
    (runs / "same" / "results.json").write_text(json.dumps({"config": {**JOB, "name": "same", "seed": 5}}))
    job = _write_job(tmp_path, "same", epochs=1)
    assert main(["train", str(job), "--runs-dir", str(runs)]) == 2


def test_bad_job_fails_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write_job(tmp_path, "bad", epochs=1, compression="topk(ratio=0.1) | dp(clip=1, sigma=1)")
    assert main(["train", str(job), "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "compression" in err and "dp" in err
    assert not os.path.exists(tmp_path / "bad")


def test_run_past_max_failures_records_failure(local_ray: None, tmp_path: Path) -> None:
    runs, marker = tmp_path / "runs", tmp_path / "crashed"
    job = _write_job(tmp_path, "doomed", epochs=1, max_failures=0)
    results = _train_with_fault(job, runs, KillRank1(step=5, marker=marker))
    final = _results(runs, "doomed")["final"]
    assert results["final"] == final
    assert marker.is_file()
    assert final["status"] == "failed" and final["error"]
    assert final["workers"] == 2 and final["restores"] == 0 and final["run_seconds"] > 0
