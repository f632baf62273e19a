"""The simulation's stand-ins for secrets: each virtual client's noise key and the coordinator's
secret, derived from one simulation secret so that a simulation is reproducible.

In a deployment these are three kinds of secret on different machines: each client's key
(`fedclient.noisekey`) and the coordinator's secret (`server.core`), both from os.urandom, and
the job seed, which every client receives. A simulation runs every party in one process, so it
models that separation without protecting anything: the simulation secret is
SHA-256("gradcomp-simulation-secret", simulation.secret_seed), with the job seed standing in
for `secret_seed` when it is not given. The coordinator code never makes this derivation; only
the simulator does.
"""

from __future__ import annotations

import hashlib

from gradcomp.config.fed import FedJob, SimulationConfig
from gradcomp.keyed_random import check_key, subkey


def simulation_secret(job: FedJob) -> bytes:
    """The one secret every simulated secret derives from (see the module docstring)."""
    sim = job.simulation or SimulationConfig()
    seed = sim.secret_seed if sim.secret_seed is not None else job.seed
    return hashlib.sha256(f"gradcomp-simulation-secret\x1f{seed}".encode()).digest()


def coordinator_secret(secret: bytes) -> bytes:
    """The simulated coordinator's secret (its client sampling and central-DP noise)."""
    return subkey(secret, "coordinator")


class ClientKeys:
    """Each virtual client's noise key, by name (`fedclient.noisekey.NoiseKeys`)."""

    def __init__(self, secret: bytes):
        self.secret = check_key(secret, "simulation secret")

    def __call__(self, client: str) -> bytes:
        return subkey(self.secret, "client-noise-key", client)
