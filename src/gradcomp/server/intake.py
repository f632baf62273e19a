"""The coordinator's update intake: what it checks of an update (or, under secure aggregation, of an
unmasked sum) before anything touches the model, and how a refusal is counted.

A mixin of `core.Coordinator`, kept apart so the round state machine reads on its own; it runs under
the coordinator's lock and state (declared below).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradcomp import metrics
from gradcomp.compression import Fields, Payload
from gradcomp.config.fed import FedJob
from gradcomp.privacy import ParticipationLedger
from gradcomp.protocol.messages import PRIVATE_EXAMPLE_COUNT
from gradcomp.protocol.model import TensorSpec
from gradcomp.secagg.plan import SecurePlan
from gradcomp.server.accounting import FedAccounting
from gradcomp.server.round_report import count_accepted
from gradcomp.server.rounds import RoundResult, RoundState, submit_refusal
from gradcomp.server.secure_round import checked_sum
from gradcomp.server.updates import Params, Rejected, client_metrics_problem, decode_update, update_nbytes
from gradcomp.strategies import Strategy
from gradcomp.strategies.aggregate import clip_update


class UpdateIntake:
    """Validation of what clients submit (see `core` for the round it feeds)."""

    job: FedJob
    current: RoundState | None
    version: int
    status: str
    totals: dict[str, int]
    spec: dict[str, TensorSpec]
    update_spec: dict[str, TensorSpec]
    dense_update_bytes: int
    client_ledger: ParticipationLedger | None
    secure_plan: SecurePlan | None
    strategy: Strategy
    params: Params
    accounting: FedAccounting
    _lock: threading.RLock
    _changed: threading.Condition

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def _now(self, now: float | None) -> float:
        raise NotImplementedError

    def touch(self, name: str, now: float | None = None) -> None:
        raise NotImplementedError

    def _release(self, r: RoundState, privacy: dict[str, Any], now: float, agg_seconds: float) -> RoundResult:
        raise NotImplementedError

    def _reject(self, reason: str, message: str, r: RoundState | None = None) -> Rejected:
        metrics.FED_UPDATES_REJECTED.labels(reason=reason).inc()
        self.totals["rejected"] += 1
        if r is not None:
            r.rejected[reason] += 1
        return Rejected(reason, message)

    def reject(self, reason: str, message: str) -> Rejected:
        """Count an update refused before it reached the core (e.g. a bad token) and return the error."""
        with self._lock:
            return self._reject(reason, message, self.current)

    def accept_update(
        self,
        name: str,
        round_id: int,
        num_examples: int,
        update: Mapping[str, Fields | Payload],
        metrics_: Mapping[str, float] | None = None,
        now: float | None = None,
        model_version: int | None = None,
    ) -> int:
        """Validate and store one client's update for the open round (see module docstring).
        `model_version`, when given, must be the model the round handed out."""
        with self._lock:
            self.touch(name, self._now(now))
            r = self._open_round_for(name, round_id, model_version)
            count, kept_metrics = self._claims(num_examples, metrics_ or {}, r)
            r.pending.add(name)
        # Decoding is the expensive part: done outside the lock so clients are validated in parallel.
        # Any failure must drop the pending mark, or `_all_in` would wait for this client until the deadline.
        try:
            dense, norm = self._decode(update)
            nbytes = update_nbytes(update)
        except Rejected as err:
            with self._lock:
                r.pending.discard(name)
                raise self._reject(err.reason, str(err), r) from None
        except BaseException:
            with self._lock:
                r.pending.discard(name)
                self._changed.notify_all()
            raise
        with self._lock:
            r.pending.discard(name)
            if self.current is not r:  # the round closed while we decoded
                raise self._reject("stale_round", f"round {round_id} closed before the update was decoded")
            r.received[name] = (count, dense)
            r.client_metrics[name] = kept_metrics
            count_accepted(r, nbytes, self.dense_update_bytes, clipped=norm > self.job.limits.max_update_norm)
            self.totals["accepted"] += 1
            self._changed.notify_all()
            return len(r.received)

    def _open_round_for(self, name: str, round_id: int, model_version: int | None) -> RoundState:
        """The open round, if `name` may submit to it now (under the lock); otherwise the refusal."""
        if self.done:
            raise self._reject("job_done", f"the job is over ({self.status}); no more updates")
        refusal = submit_refusal(self.current, self.version, name, round_id, model_version)
        if refusal is not None:
            raise self._reject(*refusal, self.current)
        assert self.current is not None
        return self.current

    def _claims(self, num_examples: int, metrics_: Mapping[str, float], r: RoundState) -> tuple[int, dict[str, float]]:
        """Validate what an update says besides its tensors; what the round keeps of it.

        Local DP keeps neither: the example count and the loss would reach the coordinator, the
        adversary there, without noise (a local-DP client sends `PRIVATE_EXAMPLE_COUNT` and no
        loss), so every update weighs the same. A request out of bounds is refused in every mode."""
        if not 1 <= num_examples <= self.job.limits.max_examples:
            raise self._reject(
                "malformed",
                f"num_examples must be in [1, {self.job.limits.max_examples}] (limits.max_examples), "
                f"got {num_examples}",
                r,
            )
        problem = client_metrics_problem(metrics_)
        if problem:
            raise self._reject("malformed", problem, r)
        if self.client_ledger is not None:
            return PRIVATE_EXAMPLE_COUNT, {}
        return int(num_examples), {k: float(v) for k, v in metrics_.items()}

    def _decode(self, update: Mapping[str, Fields | Payload]) -> tuple[Params, float]:
        """The validated dense update scaled to norm <= limits.max_update_norm, and its norm as sent."""
        dense = decode_update(update, self.update_spec, max_bytes=self.job.limits.max_update_bytes)
        return clip_update(dense, self.job.limits.max_update_norm)

    def accept_sum(
        self,
        round_id: int,
        survivors: Sequence[str],
        total: np.ndarray,
        uplink_bytes: int,
        now: float | None = None,
    ) -> RoundResult:
        """Secure aggregation: release the open round from the unmasked ring sum of `survivors`' inputs
        (all the coordinator sees of their updates; `uplink_bytes`: what the protocol cost them)."""
        with self._lock:
            now = self._now(now)
            r = self.current
            if self.done or r is None or r.number != round_id or self.secure_plan is None:
                raise self._reject("stale_round", f"no secure round {round_id} is open", r)
            try:
                mean = checked_sum(r, self.secure_plan, survivors, total, self.spec, self.job.client_spec())
            except Rejected as err:
                raise self._reject(err.reason, str(err), r) from None
            for name in survivors:
                r.received[name] = (1, mean)
                count_accepted(r, uplink_bytes // len(survivors), self.dense_update_bytes, clipped=False)
            self.totals["accepted"] += len(survivors)
            t0 = time.perf_counter()
            self.params = self.strategy.apply(self.params, mean)
            privacy = self.accounting.charge_sum(len(survivors))
            if "epsilon" in privacy:
                metrics.FED_EPSILON.set(privacy["epsilon"])
            return self._release(r, privacy, now, time.perf_counter() - t0)
