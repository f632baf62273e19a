"""A coordinator cannot make a client do unbounded work or allocate unbounded memory.

Against the client's own `WorkLimits` (flags of `gradcomp client`): local epochs, batch size, task
arguments, model size (counted on the meta device), local steps and wall time per round, and the
process's address space. Batch orders are drawn one epoch at a time. The hostile answers come
from the fake coordinator of test_client_hostile (a real gRPC server on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_client_hostile import CHILD, FakeCoordinator, Scenario, serve_fake, train_task

from gradcomp.cli import build_parser
from gradcomp.client.grpc_client import ClientError, FLClient
from gradcomp.fedclient.config import LocalTrainingConfig, TaskRefused
from gradcomp.fedclient.limits import WorkLimits, memory_ceiling
from gradcomp.fedclient.policy import ClientPolicy
from gradcomp.fedclient.runtime import ClientRuntime
from gradcomp.fedclient.train import SGDConfig, client_batches, epoch_orders


def config(task: str = "digits-mlp", epochs: int = 1, batch_size: int = 32, **task_args: object) -> LocalTrainingConfig:
    return LocalTrainingConfig(task=task, epochs=epochs, batch_size=batch_size, lr=0.1, momentum=0.0,
                               spec="topk(ratio=0.1)", seed=0, task_args=dict(task_args))  # fmt: skip


# --- batch order ----------------------------------------------------------------------------------
def test_batch_order_is_drawn_one_epoch_at_a_time() -> None:
    """A million epochs: the first batches come at once (the whole order was 400 MB and seconds before),
    and the lazy order is the one `epoch_orders` (the simulator's cohorts) draws."""
    start = time.monotonic()
    first = list(itertools.islice(client_batches(50, SGDConfig(1_000_000, 1, 0.1), 0), 120))
    assert time.monotonic() - start < 0.5 and len(first) == 120
    cfg = SGDConfig(3, 7, 0.1)
    orders = epoch_orders(50, cfg, 5)
    eager = [o[s : s + 7] for o in orders for s in range(0, 50, 7)]
    lazy = list(client_batches(50, cfg, 5))
    assert len(lazy) == len(eager) and all(a.equal(b) for a, b in zip(lazy, eager, strict=True))


# --- the policy, before anything is loaded ---------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (config(epochs=10_000_000, batch_size=1), "--max-epochs"),
        (config(batch_size=1_000_000), "--max-batch-size"),
        (config("synthetic", num_examples=10**7), "--max-task-arg"),
        (config("synthetic", num_params=float("inf")), "--max-task-arg"),
        (config("synthetic", num_examples=[1] * 10), "a list"),
        (config("synthetic", note="x" * 300), "300 characters"),
        (config("synthetic", **{f"k{i}": "y" * 200 for i in range(30)}), "bytes of JSON"),
    ],
)
def test_the_policy_refuses_too_much_work_before_loading_the_task(cfg: LocalTrainingConfig, words: str) -> None:
    start = time.monotonic()
    with pytest.raises(TaskRefused, match=words.replace("-", "\\-")):
        ClientRuntime(cfg, checks=ClientPolicy().checks())
    assert time.monotonic() - start < 2


def test_model_size_is_counted_without_building_the_model() -> None:
    limits = WorkLimits(max_model_params=50_000)
    with pytest.raises(TaskRefused, match="--max-model-params"):
        ClientRuntime(config("synthetic", num_params=900_000, num_examples=64, input_dim=16),
                      task_checks=[limits.check_model])  # fmt: skip
    ok = ClientRuntime(config("synthetic", num_params=20_000, num_examples=64, input_dim=16),
                       task_checks=[limits.check_model])  # fmt: skip
    assert sum(p.numel() for p in ok.task.make_model().parameters()) <= 50_000


def test_local_steps_and_limits_flags() -> None:
    limits = WorkLimits()
    limits.check_steps(1000, config(epochs=20, batch_size=1))  # 20,000 steps: the default bound
    with pytest.raises(TaskRefused, match="20,020 local steps"):
        limits.check_steps(1001, config(epochs=20, batch_size=1))
    args = build_parser().parse_args(["client", "--server", "x:1", "--max-steps", "5", "--max-round-seconds", "2.5"])
    assert WorkLimits.from_args(args) == WorkLimits(max_steps=5, max_round_seconds=2.5)
    helps = {a.dest: a.help for g in build_parser()._subparsers._group_actions[0].choices["client"]._action_groups
             for a in g._group_actions}  # fmt: skip
    for name, default in vars(WorkLimits()).items():  # the help says the defaults the code has
        assert f"(default {default:.15g})" in helps[name], (name, helps[name])
    with pytest.raises(ValueError, match="--max-epochs"):
        WorkLimits(max_epochs=0)
    assert WorkLimits(max_memory_mib=0).max_memory_mib == 0 and memory_ceiling(0) is None  # 0: no ceiling


# --- over gRPC, from a hostile coordinator -------------------------------------------------------------
@pytest.fixture(scope="module")
def coordinator() -> Iterator[tuple[FakeCoordinator, int]]:
    yield from serve_fake()


def client_args(port: int, **kw: object) -> argparse.Namespace:
    base = dict(server=f"127.0.0.1:{port}", token="t" * 12, client_id="c0", shard=None, tls_ca=None, tls_cert=None,
                tls_key=None, seed=0, retry_seconds=2.0, rpc_timeout=5.0, quiet=True)  # fmt: skip
    return argparse.Namespace(**(base | kw))


def run_bounded(args: argparse.Namespace, seconds: float = 60) -> object:
    """FLClient(args).run() on a thread: its exit code or exception, or 'still running' after `seconds`."""
    out: list[object] = []

    def go() -> None:
        try:
            out.append(FLClient(args).run())
        except Exception as err:  # the test inspects it
            out.append(err)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else "still running"


@pytest.mark.parametrize(
    ("task_config", "flags", "words"),
    [
        ({"local_epochs": 50_000, "batch_size": 1}, {}, "--max-epochs"),
        ({"local_epochs": 20, "batch_size": 1}, {"max_steps": 1000}, "--max-steps"),
        ({"local_epochs": 20, "batch_size": 1}, {"max_round_seconds": 0.2}, "--max-round-seconds"),
        ({"task": "synthetic", "task_args_json": json.dumps({"num_examples": 10**6})}, {},
         "--max-task-arg"),
    ],
)  # fmt: skip
def test_a_hostile_training_config_ends_the_client_with_what_it_asked(
    coordinator: tuple[FakeCoordinator, int], task_config: dict, flags: dict, words: str
) -> None:
    fake, port = coordinator
    fake.scenario = scenario = Scenario(task=train_task(Scenario().model, **task_config))
    start = time.monotonic()
    got = run_bounded(client_args(port, **flags))
    assert isinstance(got, ClientError) and words in str(got), got
    assert time.monotonic() - start < 30
    assert scenario.submitted == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and ru_maxrss in KiB")
def test_gradcomp_client_memory_ceiling_stops_an_allocation_the_arguments_allow(
    coordinator: tuple[FakeCoordinator, int], tmp_path: Path
) -> None:
    """synthetic(num_examples=100,000, input_dim=2,000): each number within --max-task-arg, their product 800 MB
    of data. Under --max-memory-mib 256 the client exits 3 naming the failed allocation, its peak RSS small."""
    fake, port = coordinator
    task_args = {"num_params": 30_000, "num_examples": 100_000, "input_dim": 2000}
    fake.scenario = scenario = Scenario(task=train_task(Scenario().model, task="synthetic",
                                                        task_args_json=json.dumps(task_args)))  # fmt: skip
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src, GRADCOMP_TOKEN="t" * 12, HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "client", "--server", f"127.0.0.1:{port}", "--client-id", "c0", "--quiet",
         "--max-memory-mib", "256"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "unusable training config from the coordinator" in proc.stderr and "alloc" in proc.stderr, proc.stderr
    peak_mib = int(proc.stderr.rsplit("maxrss_kib=", 1)[1]) / 1024
    assert peak_mib < 700, f"the client peaked at {peak_mib:.0f} MiB"
    assert scenario.submitted == []
