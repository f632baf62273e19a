"""Malicious clients for robustness studies and tests (model poisoning by one client), injected at the
narrowest seam: the pool trains every client honestly, then an attacker's serialised
`SubmitUpdateRequest` is rewritten before the coordinator sees it. The coordinator thus gets
exactly the bytes an authenticated malicious client could send.

- `norm`: the client's own update negated and scaled to L2 norm `norm` (a boosted
  model-replacement attack; 1e6 wrecked FedAvg before updates were norm-bounded).
- `examples`: the update negated at its own (ordinary) norm, claiming `num_examples`; a claim
  above `limits.max_examples` is refused outright, so a study passes the largest accepted one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from gradcomp._proto import fed_pb2
from gradcomp.compression import Dense, from_fields
from gradcomp.protocol.messages import update_fields, update_request
from gradcomp.sim.client import ClientJob, ClientResult
from gradcomp.sim.pool import ClientPool
from gradcomp.strategies.aggregate import global_norm


@dataclass(frozen=True)
class Attack:
    kind: Literal["norm", "examples"]
    attackers: frozenset[int]  # client ids (sim.state.client_id)
    norm: float = 1e6
    num_examples: int = 1_000_000
    rounds: frozenset[int] | None = None  # rounds attacked; None: every round


def tamper(request: bytes, attack: Attack) -> bytes:
    """The malicious version of one serialised update (see module docstring)."""
    msg = fed_pb2.SubmitUpdateRequest.FromString(request)
    dense = {name: from_fields(f).to_dense() for name, f in update_fields(msg).items()}
    norm = global_norm(dense)
    scale = -(attack.norm / norm if attack.kind == "norm" and norm > 0 else 1.0)
    payloads = {k: Dense((v.float() * scale).to(v.dtype).flatten(), tuple(v.shape), v.dtype) for k, v in dense.items()}
    claim = attack.num_examples if attack.kind == "examples" else msg.num_examples
    out = update_request(
        client_id=msg.client_id,
        round=msg.round,
        model_version=msg.model_version,
        num_examples=claim,
        payloads=payloads,
        metrics=dict(msg.metrics),
    )
    return out.SerializeToString()


class AttackPool:
    """A `ClientPool` whose attackers' updates are tampered with after honest training."""

    def __init__(self, inner: ClientPool, attack: Attack):
        self.inner, self.attack = inner, attack
        self.size = inner.size
        self.tampered = 0

    @property
    def vectorized(self) -> bool:
        return self.inner.vectorized

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        results = self.inner.run(jobs, model, version)
        return [self._maybe_tamper(res) for res in results]

    def _maybe_tamper(self, res: ClientResult) -> ClientResult:
        a = self.attack
        if res.cid not in a.attackers or (a.rounds is not None and res.round not in a.rounds):
            return res
        self.tampered += 1
        return dataclasses.replace(res, request=tamper(res.request, a))

    def peak_rss(self) -> list[int]:
        return self.inner.peak_rss()

    def close(self) -> None:
        self.inner.close()
