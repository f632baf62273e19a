"""One way to reach Ray for every verb: an existing cluster, or a local one kept on loopback.

A local Ray otherwise advertises the machine's first network address and gloo resolves the
host name, so a single-machine run would talk over a real interface; pinning both to
127.0.0.2 / `lo` keeps local runs (and the test suite) on loopback. A local start whose raylet
never registers (seen now and then on a loaded 2-core machine) is cleaned up and tried once more.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2
# Results up to this size travel inline with the call's reply instead of through the object
# store (Ray's default is 100 KiB). A simulation actor returns its cohort chunk's request bytes,
# a few hundred KiB per round, and the object-store path costs ~2 ms more per call on loopback.
LOCAL_INLINE_RESULT_BYTES = 4 * 1024**2
# Ray rewrites exactly 127.0.0.1 to the first real interface; any other loopback address stays.
LOCAL_NODE_IP = "127.0.0.2"
# What Ray's bare Exception says when a local raylet never registers with the GCS.
STARTUP_TIMEOUT = "timed out during startup"


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `--address`, else `$RAY_ADDRESS`, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> bool:
    """Join `address` (or $RAY_ADDRESS), else start a local Ray on loopback.

    Returns True when this call initialised Ray (the caller then shuts it down), False when
    Ray was already up in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    target = cluster_address(address)
    if target:
        ray.init(address=target, log_to_driver=kwargs.pop("log_to_driver", True), **kwargs)
        return True
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # inherited by the local raylet's workers
    options = dict(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=kwargs.pop("object_store_memory", LOCAL_OBJECT_STORE_BYTES),
        _node_ip_address=LOCAL_NODE_IP,
        _system_config=kwargs.pop("_system_config", {"max_direct_call_object_size": LOCAL_INLINE_RESULT_BYTES}),
        **kwargs,
    )
    before = child_pids()
    try:
        ray.init(**options)
    except Exception as err:  # Ray raises a bare Exception when its raylet never registers
        if STARTUP_TIMEOUT not in str(err):
            raise
        # On a small, busy machine the raylet now and then never registers with the GCS (Ray
        # waits a fixed 30 s). The half-started node's processes are orphans: stop them, try once more.
        stop_processes(child_pids() - before)
        print(f"local Ray did not start ({err}); trying once more", file=sys.stderr, flush=True)
        ray.init(**options)
    return True


def child_pids() -> set[int]:
    """This process's direct children, read from /proc (empty where there is no /proc)."""
    me, out = os.getpid(), set()
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:  # the process ended while we looked
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # field 4, after the parenthesised name
            out.add(int(entry.parent.name))
    return out


def stop_processes(pids: set[int], grace_seconds: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after the grace period; reaps our children."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if not _reaped(pid)}
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reaped(pid)


def _reaped(pid: int) -> bool:
    """True once `pid` (a child of ours) has exited and been waited for."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not ours to wait for, or already reaped
        return not Path(f"/proc/{pid}").exists()


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1): the default number of actors or workers."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
