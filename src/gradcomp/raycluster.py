"""One way to reach Ray for every verb: an existing cluster, or a local one kept on loopback.

A local Ray otherwise advertises the machine's first network address and gloo resolves the
host name, so a single-machine run would talk over a real interface; pinning both to
127.0.0.2 / `lo` keeps local runs (and the test suite) on loopback.
"""

from __future__ import annotations

import os
from typing import Any

LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2
# Ray rewrites exactly 127.0.0.1 to the first real interface; any other loopback address stays.
LOCAL_NODE_IP = "127.0.0.2"


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
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=kwargs.pop("object_store_memory", LOCAL_OBJECT_STORE_BYTES),
        _node_ip_address=LOCAL_NODE_IP,
        **kwargs,
    )
    return True


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1): the default number of actors or workers."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
