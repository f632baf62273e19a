"""Damaged checkpoints (a crash mid-write, a flipped bit, a tampered file) never start a coordinator.

The attacks: a checkpoint that still parses but has a flipped bit or NaN weights was resumed
and served; `round = 2**63` or an unknown status exited 0 silently; an empty `meta` ended in a
traceback. Each variant below is written next to a real checkpoint and must be refused with an
error naming the file and the problem; `gradcomp serve --resume` exits non-zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gradcomp._proto import checkpoint_pb2
from gradcomp.config.fed import FedJob
from gradcomp.server import store
from gradcomp.server.core import Coordinator

JOB = {"name": "ckpt", "task": {"name": "synthetic", "args": {"num_params": 500, "num_examples": 32,
       "input_dim": 8}}, "rounds": 3, "clients": {"expected": 1, "min": 1}}  # fmt: skip


def good_state() -> dict[str, Any]:
    from gradcomp.compression import Dense

    coord = Coordinator(FedJob.model_validate(JOB), {"w": torch.zeros(4), "b": torch.ones(2)})
    coord.register("a")
    coord.select_clients()
    coord.accept_update("a", 1, 5, {k: Dense(torch.full((v.numel(),), 0.1), tuple(v.shape), v.dtype)
                                    for k, v in coord.params.items()})  # fmt: skip
    assert coord.finish_round() is not None
    return coord.state_dict()


def rewrite_body(path: Path, edit: Callable[[checkpoint_pb2.Checkpoint], None]) -> None:
    """Change the protobuf and write it back with a valid checksum (damage the checksum cannot see)."""
    msg = checkpoint_pb2.Checkpoint()
    msg.ParseFromString(path.read_bytes()[len(store.MAGIC) + 32 :])
    edit(msg)
    body = msg.SerializeToString()
    import hashlib

    path.write_bytes(store.MAGIC + hashlib.sha256(body).digest() + body)


def with_meta(**changes: Any) -> Callable[[checkpoint_pb2.Checkpoint], None]:
    def edit(msg: checkpoint_pb2.Checkpoint) -> None:
        meta = json.loads(msg.meta_json)
        meta.update(changes)
        msg.meta_json = json.dumps(meta)

    return edit


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def nan_weights(path: Path) -> None:
    state = good_state()
    state["params"]["w"][1] = float("nan")
    store.save_state(path.parent, state)


def huge_round(path: Path) -> None:
    rewrite_body(path, lambda m: setattr(m, "round", 2**63))


def empty_meta(path: Path) -> None:
    rewrite_body(path, lambda m: setattr(m, "meta_json", ""))


DAMAGE = {
    "truncated": (truncate, "checksum mismatch"),
    "flipped bit": (flip_bit, "checksum mismatch"),
    "NaN weights": (nan_weights, "NaN or infinite"),
    "round 2**63": (huge_round, "out of range"),
    "unknown status": (lambda p: rewrite_body(p, with_meta(status="hacked")), "unknown status 'hacked'"),
    "empty meta": (empty_meta, "meta is not JSON"),
    "meta not an object": (lambda p: rewrite_body(p, lambda m: setattr(m, "meta_json", "[]")), "expected an object"),
    "log disagrees": (lambda p: rewrite_body(p, with_meta(log=[])), "round log"),
    "bad liveness": (
        lambda p: rewrite_body(p, with_meta(liveness={"misses": {"s": -1}, "benched_until": {}})),
        "liveness",
    ),
    "no secret": (lambda p: rewrite_body(p, with_meta(secret=None)), "secret must be 64 lowercase hex digits"),
    "short secret": (lambda p: rewrite_body(p, with_meta(secret="ab" * 16)), "64 lowercase hex digits"),
    "no checksum (old format)": (lambda p: p.write_bytes(p.read_bytes()[len(store.MAGIC) + 32 :]), "no checksum"),
}


def test_a_good_checkpoint_round_trips(tmp_path: Path) -> None:
    state = good_state()
    store.save_state(tmp_path, state)
    back = store.load_state(tmp_path)
    assert back["version"] == 1 and back["status"] == "running"
    assert torch.equal(back["params"]["w"], state["params"]["w"])
    assert back["secret"] == state["secret"] and len(bytes.fromhex(back["secret"])) == 32
    # the file holds the coordinator's secret: readable by its owner only
    assert (tmp_path / store.FILENAME).stat().st_mode & 0o777 == 0o600


def test_a_checkpoint_from_before_the_secret_resumes_with_a_fresh_one(tmp_path: Path) -> None:
    """Format 3 (and 2) held no coordinator secret: their sampling and central-DP noise were keyed by the job
    seed, and the old noise generator's state sits in the strategy scalars. Such a run resumes, with the new
    coordinator's own secret, never one derived from the job."""
    job = FedJob.model_validate({**JOB, "strategy": {"name": "fedadam"},
                                 "privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0}})  # fmt: skip
    coord = Coordinator(job, {"w": torch.zeros(4), "b": torch.ones(2)})
    store.save_state(tmp_path, coord.state_dict())

    def as_format_3(msg: checkpoint_pb2.Checkpoint) -> None:
        meta = json.loads(msg.meta_json)
        meta.pop("secret")
        meta["strategy_scalars"]["dp_noise_rng"] = [0] * 8  # the job-seeded generator's state, as format 3 kept it
        msg.meta_json, msg.format = json.dumps(meta), 3

    rewrite_body(tmp_path / store.FILENAME, as_format_3)
    state = store.load_state(tmp_path)
    assert state["secret"] is None
    resumed = Coordinator(job, {"w": torch.zeros(4), "b": torch.ones(2)})
    fresh = resumed.secret
    resumed.load_state_dict(state)
    assert resumed.secret == fresh != coord.secret


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_damaged_checkpoint_is_refused_naming_file_and_problem(tmp_path: Path, kind: str) -> None:
    store.save_state(tmp_path, good_state())
    damage, problem = DAMAGE[kind]
    path = tmp_path / store.FILENAME
    damage(path)
    with pytest.raises(store.CheckpointError) as err:
        store.load_state(tmp_path)
    assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


@pytest.mark.server
def test_gradcomp_serve_resume_exits_nonzero_on_a_flipped_bit(tmp_path: Path) -> None:
    job = dict(JOB, server={"port": 0, "host": "127.0.0.1"})
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "runs" / "ckpt"
    run_dir.mkdir(parents=True)
    from gradcomp.protocol.model import initial_params
    from gradcomp.tasks import load_task

    task_params = initial_params(load_task("synthetic", num_params=500, num_examples=32, input_dim=8), 0)
    state = good_state()
    state["params"] = task_params
    store.save_state(run_dir, state)
    flip_bit(run_dir / store.FILENAME)
    env = dict(os.environ, GRADCOMP_TOKENS="a=token-aaaaaaaa", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "gradcomp.cli", "serve", "--config", str(tmp_path / "fed.yaml"), "--runs-dir",
         str(tmp_path / "runs"), "--resume"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"{run_dir / store.FILENAME}: checksum mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- a checkpoint continues only the job that wrote it ---------------------------------------------
def _resume(job: dict[str, Any], tmp_path: Path) -> Coordinator:
    store.save_state(tmp_path, good_state())
    coord = Coordinator(FedJob.model_validate(job), {"w": torch.zeros(4), "b": torch.ones(2)})
    coord.load_state_dict(store.load_state(tmp_path))
    return coord


OTHER_JOBS = {
    "strategy": ({"strategy": {"name": "fedavgm"}}, "strategy"),
    "seed": ({"seed": 1}, "seed"),
    "name": ({"name": "other"}, "name"),
    "task": ({"task": dict(JOB["task"], args=dict(JOB["task"]["args"], num_examples=64))}, "task"),
    "central DP added": (
        {"privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 50}},
        "privacy",
    ),
}


@pytest.mark.parametrize("kind", list(OTHER_JOBS))
def test_a_checkpoint_of_another_job_is_refused_naming_what_changed(tmp_path: Path, kind: str) -> None:
    """A fedadam checkpoint used to resume as fedavgm (its moments read as velocity), and a run
    without noise as a central-DP run reporting epsilon 0: both must be refused."""
    change, named = OTHER_JOBS[kind]
    with pytest.raises(ValueError, match=f"different job \\(changed: [a-z, ]*{named}"):
        _resume(JOB | change, tmp_path)


def test_operational_changes_and_more_rounds_still_resume(tmp_path: Path) -> None:
    job = JOB | {"rounds": 10, "server": {"port": 6000, "heartbeat_seconds": 1.0}, "limits": {"chunk_bytes": 4096}}
    job["round"] = {"deadline_seconds": 5.0, "max_retries": 1}
    coord = _resume(job, tmp_path)
    assert coord.version == 1 and not coord.done


def test_a_checkpoint_without_its_job_is_refused(tmp_path: Path) -> None:
    state = good_state()
    state.pop("job")
    store.save_state(tmp_path, state)
    coord = Coordinator(FedJob.model_validate(JOB), {"w": torch.zeros(4), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="records no job"):
        coord.load_state_dict(store.load_state(tmp_path))


@pytest.mark.server
def test_a_corrupt_results_file_does_not_block_resuming_a_sound_checkpoint(tmp_path: Path) -> None:
    """The checkpoint's round log is the source of truth: results.json is rebuilt from it, the
    unreadable file kept aside; a damaged checkpoint is still refused before anything is written."""
    from gradcomp.server.app import start

    job = FedJob.model_validate(JOB | {"server": {"port": 0, "host": "127.0.0.1", "linger_seconds": 0}})
    run_dir = tmp_path / "run"
    first = start(job, run_dir, tokens={"token-aaaaaaaa": "a"})
    state = good_state()
    state["params"] = first.coord.params  # the task's real tensors
    first.stop(0)
    store.save_state(run_dir, state)
    (run_dir / "results.json").write_text('{"history": [')
    run = start(job, run_dir, resume=True, tokens={"token-aaaaaaaa": "a"})
    try:
        assert run.coord.version == 1
        assert json.loads((run_dir / "results.json").read_text())["history"][0]["round"] == 1
        assert (run_dir / "results.json.corrupt").read_text() == '{"history": ['
    finally:
        run.stop(0)
    flip_bit(run_dir / store.FILENAME)
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(store.CheckpointError, match="checksum mismatch"):
        start(job, run_dir, resume=True, tokens={"token-aaaaaaaa": "a"})
    assert (run_dir / "results.json").read_bytes() == before
