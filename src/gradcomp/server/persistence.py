"""The coordinator's checkpoint state: everything `--resume` needs, and restoring it (refused for
another job or model). A mixin of `core.Coordinator`, on its lock and state (declared below)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from gradcomp import metrics
from gradcomp.config.fed import FedJob
from gradcomp.errors import UserError
from gradcomp.keyed_random import check_key
from gradcomp.protocol.model import TensorSpec, model_spec
from gradcomp.server.accounting import FedAccounting
from gradcomp.server.liveness import Bench
from gradcomp.server.rounds import FINISHED, RUNNING, RoundState
from gradcomp.server.store import check_same_job
from gradcomp.server.updates import Params
from gradcomp.strategies import Strategy, strategy_for_job


class Persistence:
    """`state_dict` / `load_state_dict` of a coordinator."""

    job: FedJob
    secret: bytes
    version: int
    status: str
    reason: str
    params: Params
    spec: dict[str, TensorSpec]
    strategy: Strategy
    accounting: FedAccounting
    log: list[dict[str, Any]]
    totals: dict[str, int]
    bench: Bench
    current: RoundState | None
    clock: Callable[[], float]
    _idle_since: float
    _lock: threading.RLock

    @property
    def epsilon(self) -> float | None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume after the last completed round, and who was already charged
        for the open one (tensors are cloned)."""
        with self._lock:
            return {
                "job": self.job.resume_key(),
                "version": self.version,
                "status": self.status,
                "reason": self.reason,
                "params": {k: v.clone() for k, v in self.params.items()},
                "strategy": self.strategy.state_dict(),
                **self.accounting.state_dict(),  # ledger, client_ledger, charged_round
                "log": [dict(e) for e in self.log],
                "totals": dict(self.totals),
                "liveness": self.bench.state_dict(),
                "secret": self.secret.hex(),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; refused (ValueError) when it was written for another job."""
        with self._lock:
            check_same_job(state.get("job"), self.job.resume_key())
            spec = model_spec(state["params"])
            if spec != self.spec:
                raise UserError("checkpoint does not match the job's model (different tensors or shapes)")
            if state.get("secret") is not None:  # the run's own sampling and noise keys
                self.secret = check_key(bytes.fromhex(state["secret"]), "coordinator secret")
                self.strategy = strategy_for_job(self.job, self.secret)
            # else a checkpoint from before the secret (format 2, 3): this coordinator's fresh secret goes on
            self.version = int(state["version"])
            self.status = state.get("status", RUNNING)
            self.reason = state.get("reason", "")
            self.params = {k: v.clone().float() for k, v in state["params"].items()}
            self.strategy.load_state_dict(state["strategy"])
            self.accounting.load_state_dict(state, self.version)
            self.log = [dict(e) for e in state.get("log", [])]
            self.totals.update(state.get("totals", {}))
            self.bench.load_state_dict(state.get("liveness"))
            self.current = None
            self._idle_since = self.clock()
            metrics.FED_ROUND.set(self.version)
            if self.epsilon is not None:
                metrics.FED_EPSILON.set(self.epsilon)
            if self.status == RUNNING and self.version >= self.job.rounds:
                self.status = FINISHED
