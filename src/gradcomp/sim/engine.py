"""The in-process simulation loop: the real `Coordinator` driven on a virtual clock.

Per round: every virtual client heartbeats; the coordinator samples the round (its strategy's
seeded sampler); each selected client drops out or trains on the pool, and a straggler's delay
is drawn, both from `sim/fate.py` (the stream `--grpc` uses too).
An update "arrives" at round start + its straggler delay, and is handed, parsed from its
protobuf bytes, to `Coordinator.accept_update` at that virtual time. Between arrivals the
coordinator's own `finish_round` decides: aggregate when all selected clients reported,
at the deadline aggregate with >= round.min_clients or retry (new clients are then trained),
or fail after round.max_retries. Updates that arrive after their round closed are refused
by the coordinator as `stale_round`, exactly as over gRPC.

Virtual time makes a 200-round study with minute-long deadlines run as fast as the training
itself, and makes which updates are late reproducible (it does not depend on machine load).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gradcomp._proto import fed_pb2
from gradcomp.config.fed import FedJob, SimulationConfig
from gradcomp.protocol.messages import update_fields
from gradcomp.server.core import Coordinator
from gradcomp.server.model_cache import ModelCache
from gradcomp.server.rounds import RoundResult
from gradcomp.server.updates import Rejected
from gradcomp.sim.client import ClientJob, ClientResult
from gradcomp.sim.fate import client_fate
from gradcomp.sim.pool import ClientPool
from gradcomp.sim.secure import run_secure
from gradcomp.sim.state import ClientTable, client_id, client_name
from gradcomp.sim.timing import NO_TIMINGS, Timings


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RoundStats:
    """What the coordinator does not see: dropouts, late updates, real message sizes."""

    trained: int = 0
    dropped: int = 0
    late: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    payload_bytes_sent: int = 0  # every update a client sent, accepted or not (compression wire format)
    message_bytes_sent: int = 0  # the same updates as serialised SubmitUpdateRequest messages
    downlink_bytes: int = 0  # serialised global model, once per client that trained
    train_seconds: float = 0.0


class Simulation:
    def __init__(
        self,
        job: FedJob,
        sim: SimulationConfig,
        coord: Coordinator,
        clock: VirtualClock,
        pool: ClientPool,
        clients: ClientTable,
        timings: Timings = NO_TIMINGS,
    ):
        self.job, self.sim, self.coord, self.clock, self.pool, self.clients = job, sim, coord, clock, pool, clients
        self.timings = timings  # pool call, accept updates, close round (sim/timing.py)
        self.cache = ModelCache(job.limits.chunk_bytes)
        self.names = [client_name(i) for i in range(len(clients))]
        self.updates_trained = 0
        self.payload_sizes: list[int] = []  # per accepted update, for checks against the coordinator's counters

    def _heartbeat(self) -> None:
        self.coord.touch_many(self.names, self.clock.now)

    # --- one round ----------------------------------------------------------------------------
    def _train(self, names: list[str], number: int, stats: RoundStats) -> list[tuple[float, ClientResult]]:
        """Train the selected clients that do not drop out; (virtual arrival time, result) each."""
        start = self.clock.now
        jobs, arrivals = [], []
        for name in names:
            c = self.clients[client_id(name)]
            fate = client_fate(self.job.seed, self.sim, c, number)
            if fate.dropped:
                stats.dropped += 1
                continue
            arrivals.append(start + fate.delay)
            jobs.append(ClientJob(c.cid, number, self.coord.version, c.indices, c.ef, c.strategy_state))
        if not jobs:
            return []
        model = self.cache.get(*self.coord.snapshot())
        assert model is not None
        t0 = time.perf_counter()
        with self.timings.part("pool call"):
            results = self.pool.run(jobs, model, self.coord.version)
        stats.train_seconds += time.perf_counter() - t0
        for res in results:
            c = self.clients[res.cid]
            c.participations += 1
            c.ef = res.ef  # the client keeps its residual whether or not the update is accepted
            c.strategy_state = res.strategy_state
            stats.trained += 1
            stats.downlink_bytes += len(model)
            stats.payload_bytes_sent += res.payload_bytes
            stats.message_bytes_sent += len(res.request)
        self.updates_trained += len(results)
        return sorted(zip(arrivals, results, strict=True), key=lambda ar: (ar[0], ar[1].cid))

    def _submit(self, at: float, res: ClientResult, stats: RoundStats) -> None:
        with self.timings.part("accept updates"):
            self._accept(at, res, stats)

    def _finish_round(self, now: float) -> RoundResult | None:
        with self.timings.part("close round"):
            return self.coord.finish_round(now)

    def _accept(self, at: float, res: ClientResult, stats: RoundStats) -> None:
        self.clock.now = max(self.clock.now, at)
        msg = fed_pb2.SubmitUpdateRequest.FromString(res.request)
        try:
            update = update_fields(msg)
            self.coord.accept_update(
                msg.client_id, msg.round, msg.num_examples, update, dict(msg.metrics), now=at,
                model_version=msg.model_version,
            )  # fmt: skip
            self.payload_sizes.append(res.payload_bytes)
        except Rejected as err:
            stats.rejected[err.reason] += 1
            if err.reason in ("stale_round", "job_done"):  # arrived after its round closed
                stats.late += 1

    def run_round(self) -> tuple[dict[str, Any] | None, RoundStats]:
        """Open, run and close one round; returns the coordinator's log entry (None: job over)."""
        if self.coord.secure_plan is not None:
            return self._run_secure_round()
        stats = RoundStats()
        self._heartbeat()
        chosen = self.coord.select_clients(self.clock.now)
        if chosen is None:
            return None, stats
        r = self.coord.open_round()
        assert r is not None
        number, tried = r.number, set(chosen)
        inflight = self._train(chosen, number, stats)
        result = None
        while result is None and not self.coord.done:
            r = self.coord.open_round()
            assert r is not None and r.number == number
            if inflight and inflight[0][0] <= r.deadline:
                at, res = inflight.pop(0)
                self._submit(at, res, stats)
                result = self._finish_round(at)
                continue
            # nothing more arrives before the deadline: let the coordinator decide
            self.clock.now = max(self.clock.now, r.deadline)
            self._heartbeat()
            attempt = r.attempt
            result = self._finish_round(self.clock.now)
            cur = self.coord.open_round()
            if result is None and cur is not None and cur.attempt > attempt:  # retried: train the new picks
                fresh = sorted(set(cur.selected) - tried)
                tried |= set(fresh)
                inflight = sorted(inflight + self._train(fresh, number, stats), key=lambda ar: ar[0])
        for at, res in inflight:  # arrive after their round closed
            self._submit(at, res, stats)
        return (result.entry if result is not None else None), stats

    def _run_secure_round(self) -> tuple[dict[str, Any] | None, RoundStats]:
        """A round under secure aggregation (`sim/secure.py`): each attempt trains its clients and runs
        SecAgg+ among them; an aborted attempt is retried by the coordinator at the deadline."""
        stats, plan = RoundStats(), self.coord.secure_plan
        assert plan is not None
        self._heartbeat()
        if self.coord.select_clients(self.clock.now) is None:
            return None, stats
        result = None
        while result is None and not self.coord.done:
            r = self.coord.open_round()
            assert r is not None
            out = run_secure(self._train(sorted(r.selected), r.number, stats), r, plan, self.job.seed)
            stats.payload_bytes_sent += out.masked_bytes
            stats.message_bytes_sent += out.up_bytes
            if out.total is not None:
                self.clock.now = max(self.clock.now, out.finished_at)
                result = self.coord.accept_sum(r.number, out.survivors, out.total, out.up_bytes, now=self.clock.now)
                continue
            stats.rejected["secure_aborted"] += 1
            self.clock.now = max(self.clock.now, r.deadline)
            self._heartbeat()
            result = self._finish_round(self.clock.now)  # a retry asks other clients, or the job fails
        return (result.entry if result is not None else None), stats

    def run(self, on_round: Callable[[dict[str, Any], RoundStats], None] | None = None) -> None:
        while not self.coord.done:
            entry, stats = self.run_round()
            if entry is None and not self.coord.done and self.coord.open_round() is None:
                raise RuntimeError(f"the coordinator opened no round ({self.coord.status}: {self.coord.reason})")
            if entry is not None and on_round is not None:
                on_round(entry, stats)
