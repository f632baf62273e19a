"""Shared pytest setup: quiet, deterministic torch on a small machine."""

import atexit
import os
import shutil
import tempfile

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


class ManualClock:
    """A coordinator clock that moves only when a test sets `t` (deadlines without sleeping)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
