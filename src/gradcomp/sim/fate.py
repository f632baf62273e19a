"""Who drops out of a round and how late a straggler's update arrives: one random stream,
keyed by (job seed, round, client), used by the in-process and the `--grpc` simulation alike,
so the same job drops the same clients and delays them by the same seconds in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradcomp.config.fed import SimulationConfig
from gradcomp.sim.state import ClientState

_STREAM = 13  # tells this stream apart from the other seeded draws of a simulation


@dataclass(frozen=True)
class Fate:
    dropped: bool
    delay: float  # seconds after the round's start at which the update arrives (0 if dropped)


def client_fate(job_seed: int, sim: SimulationConfig, client: ClientState, round: int) -> Fate:
    """Whether `client` vanishes from `round` (its own dropout probability) and its straggler delay."""
    rng = np.random.default_rng([job_seed, round, client.cid, _STREAM])
    if rng.random() < client.dropout:
        return Fate(True, 0.0)
    return Fate(False, straggler_delay(sim, client, rng))


def straggler_delay(sim: SimulationConfig, client: ClientState, rng: np.random.Generator) -> float:
    """Extra seconds before a straggler's update arrives (0 for everyone else)."""
    st = sim.stragglers
    if not client.straggler or st.mean_seconds == 0:
        return 0.0
    if st.delay == "fixed":
        return st.mean_seconds
    if st.delay == "uniform":
        return float(rng.uniform(0, 2 * st.mean_seconds))
    return float(rng.exponential(st.mean_seconds))
