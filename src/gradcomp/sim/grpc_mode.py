"""`gradcomp fedsim --grpc`: the same virtual clients, but talking to the real coordinator service
(`gradcomp serve`'s gRPC server, health service and round loop) on 127.0.0.1, in real time.

Each virtual client has its own bearer token (handed to the coordinator directly, never through
the environment); the driver speaks for all of them over one channel: it polls `PullTask` for
each client (which is also its heartbeat), fetches the global model with `GetModel` once per
version, trains the selected clients on the pool with the shared client runtime, and sends each
client's `SubmitUpdateRequest` (the exact bytes the client built) after its straggler delay.
Dropouts never answer; who drops out and how late a straggler is come from `sim/fate.py`, the
stream the in-process simulation uses. Round deadlines are real seconds here.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.config.fed import FedJob, SimulationConfig
from gradcomp.protocol.channel import message_options
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.raycluster import connect
from gradcomp.results import print_summary
from gradcomp.server import app, store
from gradcomp.sim.client import ClientJob
from gradcomp.sim.fate import client_fate
from gradcomp.sim.keys import coordinator_secret, simulation_secret
from gradcomp.sim.pool import ClientPool, peak_rss_bytes
from gradcomp.sim.setup import make_clients, make_pool, release
from gradcomp.sim.state import ClientTable, client_id, client_name

POLL_SECONDS = 0.1
TRAIN = fed_pb2.PullTaskResponse.TRAIN
DONE = fed_pb2.PullTaskResponse.DONE


class GrpcClients:
    """The virtual clients' side of the protocol, over one channel with per-client tokens."""

    def __init__(self, job: FedJob, port: int, tokens: dict[str, str]):
        self.job = job
        self.timeout = job.limits.rpc_timeout_seconds
        options = message_options(job.limits.max_message_bytes)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.stub = fed_pb2_grpc.CoordinatorStub(self.channel)
        self.tokens = tokens  # client name -> token
        self._models: dict[int, bytes] = {}
        self.downlink_bytes = 0
        self.accepted = 0
        self.refused: dict[str, int] = {}
        self.sent_payload_bytes = 0
        self.sent_message_bytes = 0
        self._lock = threading.Lock()

    def md(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[name]}"),)

    def join(self, name: str) -> None:
        request = fed_pb2.JoinRequest(client_id=name, protocol_version=PROTOCOL_VERSION)
        self.stub.Join(request, metadata=self.md(name), timeout=self.timeout)

    def pull(self, name: str) -> fed_pb2.PullTaskResponse:
        return self.stub.PullTask(fed_pb2.PullTaskRequest(client_id=name), metadata=self.md(name), timeout=self.timeout)

    def model(self, name: str, version: int, num_chunks: int, total: int) -> bytes:
        """The global model of `version` (fetched once, in chunks; every client's download is counted)."""
        data = self._models.get(version)
        if data is None:
            chunks = [
                self.stub.GetModel(
                    fed_pb2.GetModelRequest(version=version, chunk=i), metadata=self.md(name), timeout=self.timeout
                ).data
                for i in range(num_chunks)
            ]
            data = b"".join(chunks)
            if len(data) != total:
                raise RuntimeError(f"model version {version}: got {len(data)} bytes, expected {total}")
            self._models = {version: data}
        self.downlink_bytes += len(data)
        return data

    def submit(self, name: str, request: bytes, payload_bytes: int) -> None:
        msg = fed_pb2.SubmitUpdateRequest.FromString(request)
        try:
            self.stub.SubmitUpdate(msg, metadata=self.md(name), timeout=self.timeout)
            with self._lock:
                self.accepted += 1
        except grpc.RpcError as err:
            with self._lock:
                key = err.code().name
                self.refused[key] = self.refused.get(key, 0) + 1
        with self._lock:
            self.sent_payload_bytes += payload_bytes
            self.sent_message_bytes += len(request)

    def leave(self, name: str) -> None:
        request = fed_pb2.LeaveRequest(client_id=name, reason="simulation over")
        with contextlib.suppress(grpc.RpcError):  # leaving is a courtesy; the job is over either way
            self.stub.Leave(request, metadata=self.md(name), timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()


@dataclass
class DriverStats:
    trained: int = 0
    dropped: int = 0
    handled: set[tuple[str, int]] = field(default_factory=set)  # (client, round) already trained or dropped


class GrpcDriver:
    """Polls every virtual client's task, trains the selected ones, sends their updates after their delay."""

    def __init__(self, job: FedJob, table: ClientTable, clients: GrpcClients, pool: ClientPool):
        self.job, self.table, self.clients, self.pool = job, table, clients, pool
        self.sim = job.simulation or SimulationConfig()
        self.names = [client_name(i) for i in range(len(table))]
        self.stats = DriverStats()
        self.sender = ThreadPoolExecutor(max_workers=64, thread_name_prefix="submit")
        self.peak_rss: list[int] = []  # driver, then each pool worker (bytes); filled by close()

    def close(self) -> None:
        """Record peak memory, then close the pool."""
        self.peak_rss = [peak_rss_bytes(), *self.pool.peak_rss()]
        release(self.pool, started_ray=False)

    def run(self, done: threading.Event) -> None:
        """Until the coordinator says DONE (or `done` is set): poll, train, send; then wait for the sends."""
        try:
            for name in self.names:
                self.clients.join(name)
            while not done.is_set():
                batch, finished = self._poll()
                if finished:
                    break
                if batch:
                    self._train_and_send(batch)
                else:
                    time.sleep(POLL_SECONDS)
            self.sender.shutdown(wait=True)
        finally:
            self.sender.shutdown(wait=False, cancel_futures=True)  # after an error: drop updates not yet sent

    def _poll(self) -> tuple[list[tuple[str, fed_pb2.PullTaskResponse]], bool]:
        batch: list[tuple[str, fed_pb2.PullTaskResponse]] = []
        for name in self.names:
            task = self.clients.pull(name)
            if task.action == DONE:
                return batch, True
            if task.action == TRAIN and (name, task.round) not in self.stats.handled:
                self.stats.handled.add((name, task.round))
                batch.append((name, task))
        return batch, False

    def _train_and_send(self, batch: list[tuple[str, fed_pb2.PullTaskResponse]]) -> None:
        """Train one poll's selected clients together (per model version), then send each after its delay."""
        by_version: dict[int, list[tuple[str, fed_pb2.PullTaskResponse]]] = {}
        for name, task in batch:
            by_version.setdefault(int(task.model_version), []).append((name, task))
        for version, items in by_version.items():
            jobs, delays, model = [], [], b""
            for name, task in items:
                c = self.table[client_id(name)]
                fate = client_fate(self.job.seed, self.sim, c, int(task.round))
                if fate.dropped:
                    self.stats.dropped += 1
                    continue
                model = self.clients.model(name, version, int(task.num_chunks), int(task.model_bytes))
                jobs.append(ClientJob(c.cid, int(task.round), version, c.indices, c.ef, c.strategy_state))
                delays.append(fate.delay)
            if jobs:
                self._send_later(jobs, delays, model, version)

    def _send_later(self, jobs: list[ClientJob], delays: list[float], model: bytes, version: int) -> None:
        results = self.pool.run(jobs, model, version)
        start = time.monotonic()
        for res, delay in zip(results, delays, strict=True):
            c = self.table[res.cid]
            c.participations += 1
            c.ef, c.strategy_state = res.ef, res.strategy_state
            self.stats.trained += 1
            wait = max(0.0, start + delay - time.monotonic())
            self.sender.submit(_later, wait, self.clients.submit, client_name(res.cid), res.request, res.payload_bytes)


def _later(wait: float, fn: Any, *args: Any) -> None:
    if wait > 0:
        time.sleep(wait)
    fn(*args)


def private_coordinator(job: FedJob) -> tuple[FedJob, dict[str, str]]:
    """The job for a loopback-only coordinator (ephemeral port, no TLS) and one fresh token per client."""
    job = job.model_copy(deep=True)
    n = job.clients.expected
    job.server.host, job.server.port = "127.0.0.1", 0
    job.server.tls_cert = job.server.tls_key = job.server.tls_client_ca = None
    job.server.tokens_file = None
    job.clients.min = n  # every virtual client is online: round 1 waits until all have joined (as in-process)
    return job, {client_name(i): secrets.token_urlsafe(18) for i in range(n)}


def simulate_over_grpc(
    job: FedJob, run_dir: Path, *, pool: ClientPool | None = None, show: bool = False
) -> tuple[app.Running, GrpcDriver]:
    """Start a private coordinator, drive every virtual client against it until the job ends, stop it.

    `pool` (default: the job's) is closed on return. Returns the stopped coordinator and the driver."""
    if job.secure_aggregation is not None:
        raise ValueError(
            "fedsim --grpc drives plaintext updates only; a secure_aggregation job runs in fedsim without --grpc "
            "(in-process SecAgg+ clients) or over gRPC with `gradcomp serve` and `gradcomp client`"
        )
    job, tokens = private_coordinator(job)
    table, _task = make_clients(job, quiet=not show)
    stale = run_dir / store.FILENAME
    if stale.exists():  # a simulation always starts afresh (there is no fedsim --resume)
        print(f"fedsim: removing the coordinator checkpoint of an earlier simulation: {stale}", flush=True)
        stale.unlink()
    tokens_by_value = {tok: name for name, tok in tokens.items()}
    secret = coordinator_secret(simulation_secret(job))
    run = app.start(job, run_dir, host="127.0.0.1", kind="fedsim", tokens=tokens_by_value, secret=secret)
    stop = threading.Event()
    loop = threading.Thread(target=app.round_loop, args=(run, stop, show), daemon=True, name="round-loop")
    loop.start()
    clients = GrpcClients(job, run.port, tokens)
    driver = None
    try:
        sim = job.simulation or SimulationConfig()
        driver = GrpcDriver(job, table, clients, pool if pool is not None else make_pool(job, sim.actors))
        driver.run(stop)
    finally:
        stop.set()
        loop.join(timeout=10)
        for name in tokens:
            clients.leave(name)
        clients.close()
        run.stop()
        if driver is not None:
            driver.close()
    return run, driver


def run_grpc_simulation(job: FedJob, runs_dir: Path, *, address: str | None = None, show: bool = True) -> int:
    """`gradcomp fedsim --grpc`: results.json like the in-process run, plus what went over the wire."""
    assert job.simulation is not None
    started_ray = connect(address) if job.simulation.actors != 0 else False
    try:
        run, driver = simulate_over_grpc(job, runs_dir / job.name, show=show)
    finally:
        release(None, started_ray)
    results = _finish(run, driver)
    if show:
        print_summary(results)
    return 1 if run.coord.status == "failed" else 0


def _finish(run: app.Running, driver: GrpcDriver) -> dict[str, Any]:
    coord, clients, rss = run.coord, driver.clients, driver.peak_rss
    run.record.alias_metric("test_accuracy", "accuracy")
    return run.record.finish(
        status=coord.status,
        reason=coord.reason,
        rounds=coord.version,
        transport="grpc",
        updates_trained=driver.stats.trained,
        dropped_total=driver.stats.dropped,
        updates_accepted=clients.accepted,
        updates_refused=dict(clients.refused),
        uplink_sent_bytes_total=clients.sent_payload_bytes,
        uplink_message_bytes_total=clients.sent_message_bytes,
        downlink_bytes_total=clients.downlink_bytes,
        peak_rss_driver_bytes=rss[0],
        peak_rss_actors_bytes=int(np.sum(rss[1:])) if len(rss) > 1 else 0,
        training="vectorised" if driver.pool.vectorized else "sequential",
        sequential_reason=driver.pool.fallback,
    )
