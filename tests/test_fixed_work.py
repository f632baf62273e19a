"""Fixed-work mode: a local-DP client's round takes the same work whatever its shard's size.

In local DP the coordinator is the adversary. A client sends a constant example count, but in
epoch mode its round runs epochs x ceil(examples / batch) steps, so the time between pulling the
task and submitting told the coordinator roughly how many examples it holds (60, 240 and 960
examples took 4.6, 6.6 and 18.9 ms). With `local.steps` (job) or `--local-steps` (client) a
round is exactly that many batches of `batch_size`, drawn with replacement: the optimizer steps
and the examples touched are counted here through the model itself."""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from pathlib import Path

import pytest
import torch

from gradcomp.cli import build_parser
from gradcomp.client.grpc_client import FLClient
from gradcomp.config.fed import FedJob
from gradcomp.fedclient.config import LocalTrainingConfig, TaskRefused
from gradcomp.fedclient.data import dataset_view
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.fedclient.train import SGDConfig, client_batches, num_steps
from gradcomp.protocol.codec import serialize_model
from gradcomp.protocol.messages import training_config
from gradcomp.server.app import round_loop, start
from gradcomp.tasks import load_task

TASK = load_task("digits-mlp", hidden=16)
SIZES = (60, 240, 960)  # the shard sizes the timing was measured at


def _round_work(steps: int, examples: int) -> tuple[int, int]:
    """(forward passes, example rows) of one local-DP round on a shard of `examples` examples."""
    cfg = LocalTrainingConfig(
        task="digits-mlp", epochs=2, batch_size=16, lr=0.1, momentum=0.0, spec="dp(clip=1.0, sigma=1.0)", seed=3,
        task_args={"hidden": 16}, steps=steps,
    )  # fmt: skip
    runtime = ClientRuntime(cfg, task=TASK)
    runtime.load_global(1, serialize_model(dict(TASK.make_model().named_parameters()), 1))
    seen: list[int] = []
    runtime.trainer.model.register_forward_hook(lambda m, inputs, out: seen.append(int(inputs[0].shape[0])))  # type: ignore[attr-defined]
    data = dataset_view(TASK.train_set).subset(torch.arange(examples))
    runtime.train_round(client="c", round=1, model_version=1, data=data, memory=ClientMemory())
    return len(seen), sum(seen)


def test_fixed_work_mode_does_the_same_work_for_any_shard_size() -> None:
    epoch_mode = [_round_work(0, n) for n in SIZES]
    assert epoch_mode == [(2 * -(-n // 16), 2 * n) for n in SIZES]  # what the timing revealed: work grows with n
    assert [_round_work(5, n) for n in SIZES] == [(5, 5 * 16)] * 3


def test_fixed_batches_draw_from_the_whole_shard_with_replacement() -> None:
    cfg = SGDConfig(epochs=1, batch_size=16, lr=0.1, steps=400)
    small = torch.stack(list(client_batches(10, cfg, seed=1)))
    assert small.shape == (400, 16) and num_steps(10, cfg) == num_steps(10_000, cfg) == 400
    assert set(small.flatten().tolist()) == set(range(10))  # every example can be drawn, none outside the shard
    assert torch.equal(small, torch.stack(list(client_batches(10, cfg, seed=1))))  # the seed fixes the draw
    assert not torch.equal(small, torch.stack(list(client_batches(10, cfg, seed=2))))


def _client(*extra: str) -> FLClient:
    args = build_parser().parse_args(["client", "--server", "127.0.0.1:1", "--token", "t", "--shard", "0/4", *extra])
    assert isinstance(args, argparse.Namespace)
    return FLClient(args, checks=[])


def test_the_job_or_the_client_turns_it_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    job = FedJob.model_validate(
        {"task": {"name": "digits-mlp", "args": {"hidden": 16}}, "local": {"steps": 7},
         "privacy": {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0}}
    )  # fmt: skip
    pb = training_config(job)
    assert pb.local_steps == 7 and LocalTrainingConfig.from_pb(pb).steps == 7
    plain = training_config(FedJob.model_validate({**job.model_dump(), "local": {"steps": 0}}))
    client = _client()
    try:
        assert client._build(pb)[0].config.steps == 7  # the job's setting reaches the client
        assert client._build(plain)[0].config.steps == 0
    finally:
        client.close()
    own = _client("--local-steps", "5")  # the client's own choice, whatever the coordinator asks
    try:
        assert own._build(plain)[0].config.steps == 5 and own._build(pb)[0].config.steps == 5
    finally:
        own.close()


def test_a_simulation_in_fixed_work_mode_trains_client_by_client() -> None:
    """The vectorised cohort pads clients to the epoch schedule; fixed-work mode takes the sequential path."""
    from gradcomp.sim.client import SimClientRunner

    cfg = LocalTrainingConfig(
        task="digits-mlp", epochs=1, batch_size=16, lr=0.1, momentum=0.0, spec="none", seed=0,
        task_args={"hidden": 16}, steps=3,
    )  # fmt: skip
    runner = SimClientRunner(cfg, b"\x01" * 32)
    assert not runner.vectorized and "fixed-work" in str(runner.fallback)
    with pytest.raises(ValueError, match="fixed-work"):
        SimClientRunner(cfg, b"\x01" * 32, vectorize="on")


def test_the_clients_step_bound_holds_in_fixed_work_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed-work mode's step count is the coordinator's (or the client's) number, not epochs x batches:
    the client's --max-steps bounds it too."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    job = FedJob.model_validate({"task": {"name": "digits-mlp", "args": {"hidden": 16}}, "local": {"steps": 50}})
    client = _client("--max-steps", "40")
    try:
        with pytest.raises(TaskRefused, match="50 local steps a round"):
            client._build(training_config(job))
    finally:
        client.close()


PAD_JOB = {
    "name": "pad",
    "task": {"name": "synthetic", "args": {"num_params": 500, "num_examples": 32, "input_dim": 8}},
    "rounds": 2,
    "clients": {"expected": 1, "min": 1},
    "round": {"min_clients": 1, "deadline_seconds": 30},
    "privacy": {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0},
    "server": {"port": 0, "heartbeat_seconds": 1, "linger_seconds": 0},
}


def test_a_padded_client_submits_no_earlier_than_its_padding(tmp_path: Path) -> None:
    """--pad-round-seconds: what the coordinator times between handing out a task and receiving the
    update is at least the padding, whatever the client's training took."""
    run = start(FedJob.model_validate(PAD_JOB), tmp_path / "run", host="127.0.0.1", tokens={"token-aaaaaaaa": "c0"})
    stop = threading.Event()
    loop = threading.Thread(target=round_loop, args=(run, stop, False), daemon=True)
    loop.start()
    argv = ["client", "--server", f"127.0.0.1:{run.port}", "--token", "token-aaaaaaaa", "--quiet",
            "--noise-key-file", str(tmp_path / "key"), "--pad-round-seconds", "1.5"]  # fmt: skip
    client = FLClient(build_parser().parse_args(argv))
    rpc, seen = client._rpc, []

    def spy(method: str, request: object) -> object:
        if method == "SubmitUpdate":
            seen.append(("submit", time.monotonic()))
        out = rpc(method, request)
        if method == "PullTask" and out.action == out.TRAIN:  # type: ignore[attr-defined]
            seen.append(("task", time.monotonic()))
        return out

    client._rpc = spy  # type: ignore[method-assign]
    try:
        assert client.run() == 0
    finally:
        stop.set()
        loop.join(5)
        run.stop(0)
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(seen) if (a[0], b[0]) == ("task", "submit")]
    assert len(gaps) == 2 and min(gaps) >= 1.5


def test_epoch_mode_resumes_checkpoints_written_before_local_steps() -> None:
    """A checkpoint's job key from before `local.steps` has no such key: epoch mode still matches it,
    fixed-work mode (another training algorithm) does not."""
    job = {"task": {"name": "digits-mlp"}, "local": {"epochs": 2}}
    assert "steps" not in FedJob.model_validate(job).resume_key()["local"]
    fixed = FedJob.model_validate({**job, "local": {"epochs": 2, "steps": 5}}).resume_key()
    assert fixed["local"]["steps"] == 5
