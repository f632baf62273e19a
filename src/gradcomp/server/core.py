"""The federated round core: membership, client selection, update validation, aggregation,
privacy accounting and the round log, as plain thread-safe Python (no gRPC, no files).

`server/service.py` is a thin gRPC servicer over it and `gradcomp fedsim` drives it
in-process. Public interface (kept stable):

    coord = Coordinator(job, params, evaluate=fn, checkpoint=fn, clock=time.monotonic, secret=None)
    coord.register(name) -> ClientInfo            # join; also implied by touch()
    coord.touch(name) / coord.leave(name)         # heartbeat / goodbye
    coord.select_clients() -> list[str] | None    # open a round if none is open and enough clients are connected
    coord.task_for(name) -> Task                  # Task.action: "wait" | "train" | "done"
    coord.accept_update(name, round_id, num_examples, update, metrics=None) -> int
        # update: {tensor name: compression.Fields | Payload}; raises updates.Rejected(reason, msg)
        # before anything touches the model; returns the number of updates the round holds
    coord.reject(reason, msg) -> Rejected          # count a refusal made outside the core (bad token)
    coord.finish_round(force=False) -> RoundResult | None
        # aggregate when every selected client reported (or left), or at the deadline with
        # >= round.min_clients; retry the round (keeping what arrived) with fewer; fail after
        # round.max_retries. force=True aggregates whatever arrived (>= 1 update).
    coord.tick() -> RoundResult | None            # select_clients + finish_round + join timeout
    coord.wait(timeout)                           # block until an update arrives or the state changes
    coord.snapshot() -> (version, params)          # a consistent pair, for serving the model
    coord.open_round() -> OpenRound | None          # read-only view of the open round (sim reads this)
    coord.params, coord.version, coord.round, coord.done, coord.status, coord.log, coord.epsilon
    coord.state_dict() / coord.load_state_dict(state)   # everything --resume needs, the secret included

Its parts: `membership` (who joined, shards, liveness), `rounds` (round state, the task a client
is told, the read-only `OpenRound` view), `round_report` (the round-log entry and its metrics),
`accounting` (privacy charges), `liveness` (benching), `store` (checkpoint checks). How rounds
open, retry, close and are charged: docs/architecture.md, "The coordinator".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from gradcomp import metrics
from gradcomp.config.fed import FedJob
from gradcomp.errors import UserError
from gradcomp.keyed_random import check_key, new_key
from gradcomp.protocol.model import model_spec
from gradcomp.server.accounting import FedAccounting, round_sample_rate
from gradcomp.server.intake import UpdateIntake
from gradcomp.server.liveness import Bench, prefer
from gradcomp.server.membership import ClientInfo, Membership, gauge_connected
from gradcomp.server.persistence import Persistence
from gradcomp.server.round_report import add_evaluation, round_closed, round_entry
from gradcomp.server.rounds import (
    BUDGET_EXHAUSTED,
    FAILED,
    FINISHED,
    RUNNING,
    OpenRound,
    RoundResult,
    RoundState,
    Task,
)
from gradcomp.server.secure_round import plan_for
from gradcomp.server.updates import (
    Params,
    dense_update_nbytes,
)
from gradcomp.strategies import ClientUpdate, Strategy, strategy_for_job
from gradcomp.strategies.aggregate import capped_shares

__all__ = ["BUDGET_EXHAUSTED", "FAILED", "FINISHED", "RUNNING", "ClientInfo", "Coordinator", "OpenRound", "Task"]


class Coordinator(UpdateIntake, Persistence):
    """Thread-safe round bookkeeping for one federated job (see module docstring)."""

    def __init__(
        self,
        job: FedJob,
        params: Mapping[str, torch.Tensor],
        *,
        evaluate: Callable[[Params], dict[str, float]] | None = None,
        checkpoint: Callable[[Coordinator], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        client_names: list[str] | None = None,
        secret: bytes | None = None,
    ):
        self.job = job
        self.secret = check_key(secret, "coordinator secret") if secret is not None else new_key()
        self.params: Params = {k: v.detach().clone().float() for k, v in params.items()}
        self.spec = model_spec(self.params)
        self.dense_update_bytes = dense_update_nbytes(self.spec)
        self.strategy: Strategy = strategy_for_job(job, self.secret)
        self.update_spec = model_spec(self.strategy.update_spec(self.params))  # model + the strategy's extras
        self.dp = job.dp_params()
        self.accounting = FedAccounting(job)
        self.secure_plan = plan_for(job, self.spec)  # secure aggregation: ring, quantiser, noise, graph
        self.accounting.plan = self.secure_plan
        self.ledger, self.client_ledger = self.accounting.ledger, self.accounting.clients
        self.evaluate = evaluate
        self.checkpoint = checkpoint
        self.clock = clock
        self.version = 0
        self.status = RUNNING
        self.reason = ""
        self.log: list[dict[str, Any]] = []
        self.members = Membership(job.clients.expected, job.server.liveness_window, client_names or [])
        self.current: RoundState | None = None  # internal: others read `open_round()`
        self.bench = Bench(job.round.bench_after_misses, job.round.bench_rounds)
        self.totals = {"uplink_bytes": 0, "dense_bytes": 0, "accepted": 0, "rejected": 0}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._idle_since = clock()
        self._check_budget(None, starting=True)
        gauge_connected(self)

    # --- derived ---------------------------------------------------------------------------
    @property
    def round(self) -> int:
        """Rounds completed (alias of version)."""
        return self.version

    @property
    def done(self) -> bool:
        return self.status != RUNNING

    @property
    def epsilon(self) -> float | None:
        """The epsilon this job reports: per-client worst case in local DP, the ledger's otherwise."""
        return self.accounting.epsilon

    def snapshot(self) -> tuple[int, Params]:
        """(version, what clients are served: the params and the strategy's extras) read together;
        params dicts are replaced, never mutated, per round."""
        with self._lock:
            return self.version, {**self.params, **self.strategy.served_extras(self.params)}

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def open_round(self) -> OpenRound | None:
        """A snapshot of the open round (None between rounds and after the job)."""
        with self._lock:
            return None if self.current is None else self.current.view()

    # --- membership (`membership.Membership`, under the lock) ---------------------------------
    @property
    def clients(self) -> dict[str, ClientInfo]:
        return self.members.clients

    def register(self, name: str, now: float | None = None) -> ClientInfo:
        """Join (idempotent); a client keeps its shard across a coordinator restart."""
        with self._lock:
            self.members.seen([name], self._now(now))
            self._changed.notify_all()
            return self.members.clients[name]

    def touch(self, name: str, now: float | None = None) -> None:
        self.touch_many([name], now)

    def touch_many(self, names: Iterable[str], now: float | None = None) -> None:
        """Mark clients alive at `now` (joining those not seen before)."""
        with self._lock:
            if self.members.seen(names, self._now(now)):
                self._changed.notify_all()

    def leave(self, name: str, now: float | None = None) -> None:
        with self._lock:
            self.members.leave(name)
            self._changed.notify_all()

    def connected(self, now: float | None = None) -> list[str]:
        """Clients that have not left and were heard from within `server.liveness_window`, sorted."""
        with self._lock:
            return sorted(self.members.live(self._now(now)))

    def connected_count(self) -> int:
        """len(connected()) now, without sorting (the gauge's scrape-time value)."""
        with self._lock:
            return sum(1 for _ in self.members.live(self._now(None)))

    def has_members(self) -> bool:
        """True while some client that joined has not left (the server lingers for them after the job)."""
        with self._lock:
            return self.members.has_members()

    # --- rounds ----------------------------------------------------------------------------
    def _check_budget(self, rate: float | None, starting: bool = False) -> bool:
        """False (and the job stopped) when one more round drawn at `rate` would pass the budget.

        `rate` None: the planning check when the job starts, at the configured m / N."""
        msg = self.accounting.budget_problem(rate)
        if msg is None:
            return True
        if starting and not self.log:
            raise UserError(f"refusing to start: {msg}")
        self._stop(BUDGET_EXHAUSTED, msg)
        return False

    def _stop(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason
        self.current = None
        metrics.FED_CLIENTS_SELECTED.set(0)
        self._changed.notify_all()

    def _round_pool(self, now: float, number: int) -> list[str] | None:
        """The clients round `number` is drawn from (benched ones only when it cannot open without
        them), or None while too few are connected to open it."""
        pool = self.connected(now)
        need = max(self.job.round.min_clients, self.job.clients.min if self.version == 0 else 1)
        if self.secure_plan is not None:  # fewer could only abort: a secure round needs min_survivors inputs
            need = max(need, self.secure_plan.params.min_survivors)
        if len(pool) < need:
            return None
        return prefer(pool, self.bench.benched(number), need)

    def _first_rate(self, pool: list[str]) -> float:
        """q of a round whose first draw asks `clients_per_round` of `pool`."""
        return round_sample_rate([(min(self.job.clients_per_round, len(pool)), len(pool))])

    def select_clients(self, now: float | None = None) -> list[str] | None:
        """Open the next round if none is open and enough clients are connected."""
        with self._lock:
            now = self._now(now)
            if self.done or self.current is not None:
                return None
            if self.version >= self.job.rounds:
                self._stop(FINISHED, f"all {self.job.rounds} rounds done")
                return None
            number = self.version + 1
            pool = self._round_pool(now, number)
            if pool is None or not self._check_budget(self._first_rate(pool)):
                return None
            chosen = self.strategy.configure_round(number, 0, pool, self.job.clients_per_round)
            self.current = RoundState(number, 0, set(chosen), now, now + self.job.round.deadline_seconds)
            self.current.sampling.append((len(chosen), len(pool)))
            self._charge_asked(number, chosen)
            metrics.FED_CLIENTS_SELECTED.set(len(chosen))
            metrics.FED_CLIENTS_REPORTED.set(0)
            self._changed.notify_all()
            return chosen

    def _charge_asked(self, number: int, names: Iterable[str]) -> None:
        """Local DP: charge the clients just asked, and persist the charge before any of them can train."""
        if self.accounting.charge_asked(number, names):
            metrics.FED_EPSILON.set(self.accounting.epsilon or 0.0)
            if self.checkpoint is not None:
                self.checkpoint(self)

    def task_for(self, name: str, now: float | None = None) -> Task:
        with self._lock:
            now = self._now(now)
            self.touch(name, now)
            if self.done:
                return Task("done", self.version, self.version, message=self.reason)
            r = self.current
            if r is None or name not in r.selected or name in r.received or name in r.pending:
                return Task("wait", r.number if r else self.version + 1, self.version, retry_after=0.2)
            return Task("train", r.number, self.version, deadline_in=max(0.0, r.deadline - now))

    def _all_in(self, r: RoundState) -> bool:
        """Every selected client reported or left (received is a subset of selected, so a full count
        settles it without a scan; otherwise the scan stops at the first client still awaited)."""
        if r.pending or not r.received:
            return False
        return len(r.received) == len(r.selected) or all(
            n in r.received or self.members.has_left(n) for n in r.selected
        )

    def finish_round(self, now: float | None = None, force: bool = False) -> RoundResult | None:
        """Aggregate, retry or fail the open round as its state and deadline dictate."""
        with self._lock:
            now = self._now(now)
            r = self.current
            if r is None or self.done:
                return None
            enough = len(r.received) >= self.job.round.min_clients
            if force and r.received:
                return self._aggregate(r, now)
            if self._all_in(r) and enough:
                return self._aggregate(r, now)
            if now < r.deadline:
                return None
            if enough:
                return self._aggregate(r, now)
            if r.attempt >= self.job.round.max_retries:
                self._stop(
                    FAILED,
                    f"round {r.number}: only {len(r.received)} of the required {self.job.round.min_clients} "
                    f"updates after {r.attempt + 1} attempts of {self.job.round.deadline_seconds:g} s",
                )
                return None
            self._retry(r, now)
            return None

    def _retry(self, r: RoundState, now: float) -> None:
        """Keep what arrived (it was computed on the same global model) and ask more clients, unless
        the higher sampling rate that asking more gives the round would pass the budget."""
        want = max(self.job.clients_per_round - len(r.received), self.job.round.min_clients - len(r.received))
        pool = [n for n in self.connected(now) if n not in r.received]
        pool = prefer(pool, (r.selected - set(r.received)) | r.missed | self.bench.benched(r.number), want)
        problem = self.accounting.retry_problem(round_sample_rate([*r.sampling, (min(want, len(pool)), len(pool))]))
        if problem is not None:
            self._stop(BUDGET_EXHAUSTED, f"round {r.number}: {problem}")
            return
        r.attempt += 1
        metrics.FED_ROUND_RETRIES.inc()
        r.missed |= r.selected - set(r.received)
        chosen = self.strategy.configure_round(r.number, r.attempt, pool, want)
        r.sampling.append((len(chosen), len(pool)))
        r.selected = set(r.received) | set(chosen)
        r.deadline = now + self.job.round.deadline_seconds
        self._charge_asked(r.number, chosen)
        metrics.FED_CLIENTS_SELECTED.set(len(r.selected))
        self._changed.notify_all()

    def _account(self, r: RoundState) -> dict[str, Any]:
        """Charge the aggregated round to the ledgers; the round-log fields they give.

        The released model is charged at the round's real sampling rate (`RoundState.sample_rate`):
        central DP's `epsilon`, local DP's `epsilon_released_model`. Local DP's per-client charges were
        made when each client was asked (`_charge_asked`); `epsilon` is then the worst client's.
        Cannot raise BudgetExceeded: the rate was checked when the round opened and at each retry.
        """
        out = self.accounting.charge_release(r.sample_rate)
        if "epsilon" in out:
            metrics.FED_EPSILON.set(out["epsilon"])
        return out

    def _aggregate(self, r: RoundState, now: float) -> RoundResult:
        t0 = time.perf_counter()
        names = sorted(r.received)
        shares = capped_shares([r.received[n][0] for n in names], self.job.limits.max_weight_share)
        updates = [ClientUpdate(n, r.received[n][0], r.received[n][1], w) for n, w in zip(names, shares, strict=True)]
        self.params = self.strategy.apply(self.params, self.strategy.aggregate(r.number, updates))
        return self._release(r, self._account(r), now, time.perf_counter() - t0)

    def _release(self, r: RoundState, privacy: dict[str, Any], now: float, agg_seconds: float) -> RoundResult:
        """Close aggregated round `r`: version, round log (with its privacy fields), bench, persistence."""
        self.version = r.number
        entry = round_entry(r, agg_seconds, now, keep_claims=self.job.reports_client_claims())
        if self.evaluate is not None:
            add_evaluation(entry, self.evaluate(self.params))
        entry.update(privacy)
        benched = self.bench.record(r.number, r.selected | r.missed, r.received)
        if benched:
            entry["benched"] = benched
        metrics.FED_CLIENTS_BENCHED.set(len(self.bench.benched(r.number + 1)))
        self.log.append(entry)
        self.totals["uplink_bytes"] += r.uplink_bytes
        self.totals["dense_bytes"] += r.dense_bytes
        self.current = None
        self._idle_since = now
        round_closed(r, self.version, now, agg_seconds)
        self._after_round(now)
        self._changed.notify_all()
        return RoundResult(r.number, entry)

    def _after_round(self, now: float) -> None:
        """Finish the job or check the next round's budget; then persist the round."""
        if self.version >= self.job.rounds:
            self.status, self.reason = FINISHED, f"all {self.job.rounds} rounds done"
        else:
            pool = self._round_pool(now, self.version + 1)
            if pool is not None:  # otherwise the round's opening checks, once enough clients connect
                self._check_budget(self._first_rate(pool))
        if self.checkpoint is not None:
            self.checkpoint(self)

    def tick(self, now: float | None = None) -> RoundResult | None:
        """One step of the round loop: open a round when possible, close it when due."""
        with self._lock:
            now = self._now(now)
            if self.done:
                return None
            if self.current is None:
                self.select_clients(now)
                if (
                    self.current is None
                    and not self.done
                    and now - self._idle_since > self.job.round.join_timeout_seconds
                ):
                    self._stop(
                        FAILED,
                        f"only {len(self.connected(now))} clients connected after "
                        f"{self.job.round.join_timeout_seconds:g} s; need {max(self.job.clients.min, 1)}",
                    )
                return None
            return self.finish_round(now)

    def wait(self, timeout: float) -> None:
        """Sleep until something changes (an update, a join, a leave) or `timeout` passes."""
        with self._changed:
            self._changed.wait(timeout)
