"""`gradcomp fedsim --grpc`: the same virtual clients, but talking to the real coordinator service
(`gradcomp serve`'s gRPC server, health service and round loop) on 127.0.0.1, in real time.

Each virtual client has its own bearer token; the driver speaks for all of them over one
channel: it polls `PullTask` for each client (which is also its heartbeat), fetches the
global model with `GetModel` once per version, trains the selected clients on the actor
pool, and sends each client's `SubmitUpdateRequest` (the exact bytes the client built) after
its straggler delay. Dropouts never answer. Round deadlines are real seconds here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.config.fed import FedJob, SimulationConfig
from gradcomp.protocol.channel import message_options
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.results import print_summary
from gradcomp.sim.client import ClientJob
from gradcomp.sim.engine import client_id, client_name, straggler_delay
from gradcomp.sim.pool import peak_rss_bytes
from gradcomp.sim.state import client_seed

POLL_SECONDS = 0.1


class GrpcClients:
    """The virtual clients' side of the protocol, over one channel with per-client tokens."""

    def __init__(self, job: FedJob, port: int, tokens: dict[str, str]):
        self.job = job
        self.timeout = job.limits.rpc_timeout_seconds
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=message_options(job.limits.max_message_bytes))
        self.stub = fed_pb2_grpc.CoordinatorStub(self.channel)
        self.tokens = tokens
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
        self.stub.Join(
            fed_pb2.JoinRequest(client_id=name, protocol_version=PROTOCOL_VERSION),
            metadata=self.md(name),
            timeout=self.timeout,
        )

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


def run_grpc_simulation(job: FedJob, runs_dir: Path, *, address: str | None, show: bool) -> int:
    from gradcomp.raycluster import connect
    from gradcomp.server import app, store
    from gradcomp.sim.run import make_clients, make_pool

    sim = job.simulation or SimulationConfig()
    n = job.clients.expected
    names = [client_name(i) for i in range(n)]
    tokens = {name: secrets.token_urlsafe(18) for name in names}
    # A private, loopback-only coordinator: ephemeral port, one fresh token per virtual client.
    job.server.host, job.server.port = "127.0.0.1", 0
    job.server.tls_cert = job.server.tls_key = job.server.tls_client_ca = None
    job.server.tokens_file = None
    job.server.tokens_env = "GRADCOMP_FEDSIM_TOKENS"
    job.clients.min = n  # every virtual client is online: round 1 waits until all have joined (as in-process)
    os.environ[job.server.tokens_env] = ",".join(f"{name}={tok}" for name, tok in tokens.items())
    table, _task = make_clients(job, quiet=not show)
    started_ray = connect(address) if sim.actors != 0 else False
    run_dir = runs_dir / job.name
    stale = run_dir / store.FILENAME
    if stale.exists():  # a simulation always starts afresh (there is no fedsim --resume)
        print(f"fedsim: removing the coordinator checkpoint of an earlier simulation: {stale}", flush=True)
        stale.unlink()
    try:
        run = app.start(job, run_dir, host="127.0.0.1", kind="fedsim")
    except BaseException:
        if started_ray:
            import ray

            ray.shutdown()
        raise
    stop = threading.Event()
    loop = threading.Thread(target=app.round_loop, args=(run, stop, show), daemon=True, name="round-loop")
    loop.start()
    clients = GrpcClients(job, run.port, tokens)
    sender = ThreadPoolExecutor(max_workers=64, thread_name_prefix="submit")
    pool = None
    stats: dict[str, Any] = {"trained": 0, "dropped": 0}
    try:
        pool = make_pool(job, sim.actors)
        for name in names:
            clients.join(name)
        handled: set[tuple[str, int]] = set()  # (client, round) already trained or dropped
        while not run.coord.done:
            batch: list[tuple[str, fed_pb2.PullTaskResponse]] = []
            for name in names:
                task = clients.pull(name)
                if task.action == fed_pb2.PullTaskResponse.DONE:
                    break
                if task.action == fed_pb2.PullTaskResponse.TRAIN and (name, task.round) not in handled:
                    handled.add((name, task.round))
                    batch.append((name, task))
            if batch:
                _train_and_send(job, sim, table, clients, pool, sender, batch, stats)
            else:
                time.sleep(POLL_SECONDS)
        sender.shutdown(wait=True)
    finally:
        sender.shutdown(wait=False, cancel_futures=True)  # after an error: drop updates not yet sent
        stop.set()
        loop.join(timeout=10)
        for name in names:
            clients.leave(name)
        clients.close()
        run.stop()
        rss = [peak_rss_bytes(), *(pool.peak_rss() if pool is not None else [])]
        if pool is not None:
            pool.close()
        if started_ray:
            import ray

            ray.shutdown()
    coord = run.coord
    run.record.alias_metric("test_accuracy", "accuracy")
    results = run.record.finish(
        status=coord.status,
        reason=coord.reason,
        rounds=coord.version,
        transport="grpc",
        updates_trained=stats["trained"],
        dropped_total=stats["dropped"],
        updates_accepted=clients.accepted,
        updates_refused=dict(clients.refused),
        uplink_sent_bytes_total=clients.sent_payload_bytes,
        uplink_message_bytes_total=clients.sent_message_bytes,
        downlink_bytes_total=clients.downlink_bytes,
        peak_rss_driver_bytes=rss[0],
        peak_rss_actors_bytes=int(np.sum(rss[1:])) if len(rss) > 1 else 0,
    )
    if show:
        print_summary(results)
    return 1 if coord.status == "failed" else 0


def _train_and_send(
    job: FedJob,
    sim: SimulationConfig,
    table: Any,
    clients: GrpcClients,
    pool: Any,
    sender: ThreadPoolExecutor,
    batch: list[tuple[str, fed_pb2.PullTaskResponse]],
    stats: dict[str, Any],
) -> None:
    """Train one poll's selected clients together, then send each update after its delay."""
    by_version: dict[int, list[tuple[str, fed_pb2.PullTaskResponse]]] = {}
    for name, task in batch:
        by_version.setdefault(int(task.model_version), []).append((name, task))
    for version, items in by_version.items():
        jobs, delays = [], []
        model = b""
        for name, task in items:
            cid = client_id(name)
            c = table[cid]
            rng = np.random.default_rng([job.seed, int(task.round), cid, 13])
            if rng.random() < c.dropout:
                stats["dropped"] += 1
                continue
            model = clients.model(name, version, int(task.num_chunks), int(task.model_bytes))
            seed = client_seed(job.seed, cid, c.participations)
            jobs.append(ClientJob(cid, int(task.round), version, c.indices, seed, c.ef))
            delays.append(straggler_delay(sim, c, rng))
        if not jobs:
            continue
        results = pool.run(jobs, model, version)
        start = time.monotonic()
        for res, delay in zip(results, delays, strict=True):
            c = table[res.cid]
            c.participations += 1
            c.ef = res.ef
            stats["trained"] += 1
            wait = max(0.0, start + delay - time.monotonic())
            sender.submit(_later, wait, clients.submit, client_name(res.cid), res.request, res.payload_bytes)


def _later(wait: float, fn: Any, *args: Any) -> None:
    if wait > 0:
        time.sleep(wait)
    fn(*args)
