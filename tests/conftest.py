"""Shared pytest setup: quiet, deterministic torch on a small machine."""

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# gloo on loopback for every test, not only after the first local Ray (raycluster.connect sets it
# for the rest of the process): the gloo tests must not depend on the order they run in.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# `gradcomp client` creates its noise key under $XDG_STATE_HOME by default: in tests, not in ~.
_STATE = tempfile.mkdtemp(prefix="gradcomp-test-state-")
os.environ["XDG_STATE_HOME"] = _STATE
atexit.register(shutil.rmtree, _STATE, True)

import pytest  # noqa: E402
import yaml  # noqa: E402

from gradcomp.compression import Dense  # noqa: E402
from gradcomp.config.fed import FedJob  # noqa: E402


class ManualClock:
    """A coordinator clock that moves only when a test sets `t` (deadlines without sleeping)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


# --- helpers shared by test modules (import them: `from conftest import free_port`) ---------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that must be told a port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A two-tensor model for coordinator tests that never train: shapes are all the coordinator checks.
SMALL_PARAMS: dict[str, torch.Tensor] = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def dense_update(value: float = 0.1, params: dict[str, torch.Tensor] | None = None) -> dict[str, Dense]:
    """A client update of `params` (default SMALL_PARAMS) with every value `value`, as the coordinator decodes it."""
    params = SMALL_PARAMS if params is None else params
    return {k: Dense(torch.full((v.numel(),), value), tuple(v.shape), v.dtype) for k, v in params.items()}


def fed_job(base: dict[str, Any], **overrides: Any) -> FedJob:
    """A validated federated job: `base` with top-level sections replaced by `overrides`."""
    return FedJob.model_validate({**base, **overrides})


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write a job (or any YAML) file and return its path."""
    path.write_text(yaml.safe_dump(data))
    return path
