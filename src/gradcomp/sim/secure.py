"""A simulated round under secure aggregation: the trained clients run the real SecAgg+ state
machines (`secagg.simulate`, every message through its byte encoding), and the coordinator gets
only the unmasked sum of the survivors.

A client that dropped out before training never advertises; one whose update would arrive after
the round's deadline (a straggler) advertised and shared its keys but misses the masked-input step,
so its neighbours' shares of its mask key unmask the sum without it. Each attempt of a round runs
under its own round id and graph seed, so a retried round never reuses masks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from gradcomp.secagg.plan import SecurePlan
from gradcomp.secagg.simulate import run_round
from gradcomp.server.rounds import OpenRound
from gradcomp.sim.client import ClientResult
from gradcomp.sim.state import client_name

STRAGGLER_COMPLETES = 2  # phases a straggler finishes: advertise and share, not its masked input


@dataclass
class SecureOutcome:
    total: np.ndarray | None  # the unmasked ring sum (None: aborted)
    survivors: list[str]
    aborted: str | None
    up_bytes: int  # every message the clients sent, all phases
    down_bytes: int
    masked_bytes: int  # the masked inputs alone
    finished_at: float


def run_secure(trained: list[tuple[float, ClientResult]], r: OpenRound, plan: SecurePlan, seed: int) -> SecureOutcome:
    """One attempt of round `r` over the clients that trained, (arrival time, result) each."""
    inputs = {res.cid: res.secure_input for _, res in trained if res.secure_input is not None}
    late = {res.cid: STRAGGLER_COMPLETES for at, res in trained if at > r.deadline}
    on_time = [at for at, _ in trained if at <= r.deadline]
    finished = max(on_time) if on_time else r.deadline
    if len(inputs) - len(late) < plan.params.min_survivors:
        return SecureOutcome(None, [], "too few clients trained in time", 0, 0, 0, r.deadline)
    tag = f"gradcomp-secagg/{seed}/{r.number}/{r.attempt}".encode()
    report = run_round(inputs, plan.params, late, round_id=tag, graph_seed=hashlib.sha256(tag).digest())
    up = sum(sum(per.values()) for per in report.up.values())
    down = sum(sum(per.values()) for per in report.down.values())
    masked = sum(report.up.get("masked", {}).values())
    survivors = [client_name(c) for c in sorted(report.survivors)]
    return SecureOutcome(report.total, survivors, report.aborted, up, down, masked, finished)
