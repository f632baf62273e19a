"""Joining or starting Ray for a simulation, the same way on a laptop and on a cluster."""

from __future__ import annotations

import os


def init_ray(address: str | None = None) -> bool:
    """Connect to `address` (or $RAY_ADDRESS), else start a small local Ray. True when this call
    started or joined Ray (the caller then shuts it down); False when Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=True)
    return True


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
