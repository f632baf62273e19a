"""A coordinator cannot make a client run code or weaken its privacy.

The attack: the coordinator names `subprocess:getoutput` (or any importable module) as the task;
the client imported it and called it with the coordinator's arguments. Now the client refuses
any task that is neither built in nor on its own `--allow-task` list, before importing anything,
and refuses a compression spec below its own privacy floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from gradcomp._proto import fed_pb2
from gradcomp.client.grpc_client import ClientError, FLClient
from gradcomp.fedclient.config import LocalTrainingConfig, TaskRefused
from gradcomp.fedclient.policy import ClientPolicy
from gradcomp.fedclient.runtime import ClientRuntime

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")
def make(**kw):
    raise SystemExit("called")
"""


def config(task: str, spec: str = "none", **args: object) -> LocalTrainingConfig:
    return LocalTrainingConfig(task, 1, 8, 0.1, 0.0, spec, 0, dict(args))


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module whose mere import leaves a marker file (the proof that no import happened)."""
    marker = tmp_path / "imported.txt"
    name = f"gradcomp_evil_task_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def test_a_coordinator_named_entry_point_is_refused_before_any_import(evil_module: tuple[str, Path]) -> None:
    name, marker = evil_module
    for task in (f"{name}:make", "subprocess:getoutput"):
        with pytest.raises(TaskRefused, match="nothing was imported"):
            ClientRuntime(config(task, cmd="touch /tmp/pwned"), checks=ClientPolicy().checks())
    assert not marker.exists() and name not in sys.modules


def test_the_client_can_allow_its_own_entry_point(evil_module: tuple[str, Path]) -> None:
    name, marker = evil_module
    with pytest.raises(SystemExit, match="called"):  # allowed: imported and called, as the client asked
        ClientRuntime(config(f"{name}:make"), checks=ClientPolicy(frozenset({f"{name}:make"})).checks())
    assert marker.read_text() == "imported"


def test_builtin_tasks_need_no_allowlist() -> None:
    runtime = ClientRuntime(config("synthetic", num_params=500, num_examples=16, input_dim=8),
                            checks=ClientPolicy().checks())  # fmt: skip
    assert runtime.task.name == "synthetic"


@pytest.mark.parametrize(
    ("policy", "spec", "problem"),
    [
        (ClientPolicy(require_dp=True), "topk(ratio=0.1) | ef", "requires a dp stage"),
        (ClientPolicy(min_noise_multiplier=1.0), "dp(clip=1.0, sigma=0.5)", "below this client's floor"),
        (ClientPolicy(max_clip=1.0), "dp(clip=5.0, sigma=2.0)", "above this client's ceiling"),
        (ClientPolicy(min_noise_multiplier=0.1), "dp(clip=1.0, sigma=0.0)", "adds none"),  # central DP's clip-only spec
        # --require-dp alone must not accept a dp stage that adds no noise
        (ClientPolicy(require_dp=True), "dp(clip=1.0, sigma=0.0) | ef", "adds none"),
        (ClientPolicy(max_clip=2.0), "dp(clip=1.0, sigma=0.0)", "adds none"),
    ],
)
def test_a_spec_below_the_privacy_floor_is_refused(policy: ClientPolicy, spec: str, problem: str) -> None:
    with pytest.raises(TaskRefused, match=problem):
        policy.check_privacy(config("synthetic", spec))


def test_a_spec_meeting_the_floor_passes() -> None:
    policy = ClientPolicy(require_dp=True, min_noise_multiplier=0.8, max_clip=2.0)
    policy.check_privacy(config("synthetic", "dp(clip=1.0, sigma=0.8) | rtopk(ratio=0.01, r=0.05) | ef"))


def test_gradcomp_client_refuses_the_attack_with_its_default_policy(evil_module: tuple[str, Path]) -> None:
    """The real client with the flags `gradcomp client` parses: a TrainingConfig naming the module fails clearly."""
    from gradcomp.cli import build_parser

    name, marker = evil_module
    args = build_parser().parse_args(["client", "--server", "127.0.0.1:1", "--token", "t" * 12, "--shard", "0/1"])
    client = FLClient(args)
    try:
        cfg = fed_pb2.TrainingConfig(task=f"{name}:make", task_args_json=json.dumps({}), local_epochs=1,
                                     batch_size=8, lr=0.1, compression="none")  # fmt: skip
        with pytest.raises(ClientError, match="refusing the coordinator's task"):
            client._setup(cfg)
    finally:
        client.close()
    assert not marker.exists() and name not in sys.modules
    unguarded = FLClient(args, checks=[])  # the client as it was: no checks, so the attack runs
    try:
        with pytest.raises(SystemExit, match="called"):
            unguarded._setup(cfg)
    finally:
        unguarded.close()
    assert marker.exists()
    floor = build_parser().parse_args(["client", "--server", "x:1", "--require-dp", "--min-noise-multiplier", "1",
                                       "--max-clip", "2", "--allow-task", "a:b"])  # fmt: skip
    assert ClientPolicy.from_args(floor) == ClientPolicy(frozenset({"a:b"}), True, 1.0, 2.0)
    assert isinstance(args, argparse.Namespace)
