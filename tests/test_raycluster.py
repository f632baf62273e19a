"""raycluster.connect: a local Ray whose first start times out is cleaned up and started again."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from gradcomp import raycluster


@pytest.mark.ray
def test_local_start_that_times_out_is_cleaned_up_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    real_init = ray.init
    calls: list[dict[str, Any]] = []
    orphan: list[subprocess.Popen[bytes]] = []

    def flaky_init(**options: Any) -> Any:
        calls.append(options)
        if len(calls) == 1:  # what a half-started node leaves: a child process, then Ray's bare Exception
            orphan.append(subprocess.Popen(["sleep", "60"]))
            raise Exception("The current node timed out during startup. This could happen because ...")
        return real_init(**options)

    monkeypatch.setattr(ray, "init", flaky_init)
    try:
        assert raycluster.connect(num_cpus=1, log_to_driver=False) is True
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()
    assert len(calls) == 2 and calls[0] == calls[1]
    assert orphan[0].poll() is not None, "the failed attempt's process was stopped"
    assert not Path(f"/proc/{orphan[0].pid}").exists()


def test_other_start_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls = []

    def broken_init(**options: Any) -> Any:
        calls.append(options)
        raise ValueError("object_store_memory is too small")

    monkeypatch.setattr(ray, "init", broken_init)
    with pytest.raises(ValueError, match="too small"):
        raycluster.connect(num_cpus=1)
    assert len(calls) == 1


def test_child_pids_sees_our_children_only() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert child.pid in raycluster.child_pids()
        raycluster.stop_processes({child.pid}, grace_seconds=2)
        assert child.pid not in raycluster.child_pids()
    finally:
        child.kill()
        child.wait()
