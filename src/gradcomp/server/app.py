"""`gradcomp serve`: load the job, build the coordinator, start gRPC + health + /metrics, run rounds.

The round loop is a thread that calls `Coordinator.tick()` whenever something changes (or
every 50 ms); gRPC handler threads only validate and store updates. After the last round
the server keeps answering `DONE` for `server.linger_seconds` (or until every client left),
then stops. Exit status: 0 finished or budget spent, 1 failed (a round could not be filled).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from gradcomp import metrics
from gradcomp._proto import fed_pb2_grpc
from gradcomp.config.fed import FedJob, load_fed_job
from gradcomp.errors import UserError
from gradcomp.protocol.channel import is_loopback_host
from gradcomp.protocol.model import initial_params
from gradcomp.results import RunRecord, atomic_write_json, human_bytes, print_summary
from gradcomp.server import store
from gradcomp.server.auth import AuthGate, TokenBook, load_tokens
from gradcomp.server.core import FAILED, Coordinator
from gradcomp.server.health import NOT_SERVING, Health
from gradcomp.server.secure_rounds import SecureRounds
from gradcomp.server.service import CoordinatorService
from gradcomp.server.tls import server_credentials
from gradcomp.server.transport import connection_cap, raise_file_limit, server_options
from gradcomp.tasks import Task, load_task

log = logging.getLogger("gradcomp.server")


def make_evaluator(task: Task) -> Callable[[dict[str, torch.Tensor]], dict[str, float]] | None:
    """The task's test-set metrics of a global model, on one model object kept for it."""
    if task.test_set is None:
        return None
    model = task.make_model()

    def run(params: dict[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(params, strict=False)
        return task.evaluate(model)

    return run


@dataclass
class Running:
    """A started coordinator: what tests and `run_serve` hold on to."""

    coord: Coordinator
    server: grpc.Server
    health: Health
    port: int
    metrics_port: int | None
    run_dir: Path
    record: RunRecord
    secure: SecureRounds | None = None  # secure aggregation's sessions, ticked by the round loop

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; calls still open after `grace` (health Watch streams among them) are cancelled.
        Bounded: an open stream or a stuck handler cannot hold the final status back."""
        self.health.close()
        if not self.server.stop(grace).wait(grace + 5.0):
            log.warning("gRPC server did not stop within %.1f s; going on without it", grace + 5.0)


def resolve_host(job: FedJob, cli_host: str | None) -> str:
    """The bind address: `--host`, else server.host, else 0.0.0.0 with TLS and 127.0.0.1 without.
    Plaintext on anything but loopback is refused unless server.insecure_plaintext opts in."""
    host = cli_host or job.server.host
    if host is None:
        return "0.0.0.0" if job.server.tls else "127.0.0.1"
    if not job.server.tls and not job.server.insecure_plaintext and not is_loopback_host(host):
        raise UserError(
            f"refusing to serve without TLS on {host}, which is not a loopback address: tokens, updates and the "
            "model would cross the network in clear text. Set server.tls_cert and server.tls_key "
            "(python -m gradcomp.server.tls makes them), bind 127.0.0.1, or accept clear text with "
            "server.insecure_plaintext: true (gradcomp serve --insecure)"
        )
    return host


def insecure_warning(host: str) -> str:
    where = "loopback only" if is_loopback_host(host) else f"{host} -- REACHABLE FROM THE NETWORK"
    bar = "!" * 78
    return (
        f"{bar}\n!! WARNING: gradcomp serve is running WITHOUT TLS ({where}).\n"
        f"!! Tokens and model updates travel in clear text. Set server.tls_cert/tls_key\n"
        f"!! (python -m gradcomp.server.tls --out certs --host HOST) before leaving a trusted network.\n{bar}"
    )


def no_secret_warning(rounds: int) -> str:
    """Said when a checkpoint from before the coordinator's secret (format 2 or 3) is resumed."""
    return (
        f"gradcomp serve: warning: the checkpoint holds no coordinator secret (format 2 or 3): its {rounds} rounds "
        "sampled clients and drew central-DP noise from the job seed, which every client knows. The rounds from "
        f"{rounds + 1} on use a fresh secret."
    )


def checkpointer(job: FedJob, run_dir: Path, record: RunRecord) -> Callable[[Coordinator], None]:
    """What runs after every round: the coordinator state to disk, then results.json from it."""

    def checkpoint(c: Coordinator) -> None:
        state = c.state_dict()
        store.save_state(run_dir, state)  # the round becomes durable here
        totals = state["totals"]
        record.replace_history(state["log"], bytes_sent=totals["uplink_bytes"], dense_bytes=totals["dense_bytes"])
        record.set_privacy(c.epsilon, job.privacy.delta if c.epsilon is not None else None)
        record.save()

    return checkpoint


def resumed_record(run_dir: Path, name: str, kind: str, config: dict[str, Any]) -> RunRecord:
    """The run's record for `--resume`. The checkpoint's round log is the source of truth, so a
    results.json that does not parse is set aside (results.json.corrupt) and rebuilt from it,
    instead of blocking the resume of a sound checkpoint."""
    try:
        return RunRecord.resume(run_dir, name, kind, config)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        path = run_dir / "results.json"
        path.replace(run_dir / "results.json.corrupt")
        print(f"gradcomp: {path} is unreadable ({err}); kept as results.json.corrupt, rebuilt from the checkpoint",
              file=sys.stderr, flush=True)  # fmt: skip
        return RunRecord(run_dir, name, kind, config)


def run_record(job: FedJob, run_dir: Path, kind: str, task: Task, resume: bool) -> RunRecord:
    """The run's results.json record (continued on `--resume`), with the task's description."""
    config = json.loads(job.model_dump_json())
    record = resumed_record(run_dir, job.name, kind, config) if resume else RunRecord(run_dir, job.name, kind, config)
    record.set_task(task.info)
    return record


def make_grpc_server(job: FedJob, book: TokenBook, coord: Coordinator) -> grpc.Server:
    """A gRPC server whose calls pass the `AuthGate` (token, certificate, size) before being read."""

    def refused(method: str, code: grpc.StatusCode, reason: str | None, message: str) -> None:
        metrics.FED_RPCS.labels(method=method, code=code.name).inc()
        if method == "SubmitUpdate" and reason is not None:
            coord.reject(reason, message)

    limits = job.limits
    gate = AuthGate(
        book,
        require_cert=job.server.tls_client_ca is not None,
        max_request_bytes=limits.max_message_bytes,
        refused=refused,
        calls_per_client=limits.max_calls_per_client,
        read_seconds=limits.request_read_seconds,
    )
    limit = job.server.max_concurrent_rpcs
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=limit),
        interceptors=[gate],
        options=server_options(limits, connection_cap(limits, raise_file_limit())),
        maximum_concurrent_rpcs=limit,
    )


def start(
    job: FedJob,
    run_dir: Path,
    *,
    resume: bool = False,
    host: str | None = None,
    kind: str = "fed",
    tokens: Mapping[str, str] | None = None,
    secret: bytes | None = None,
) -> Running:
    """Build and start everything (no round loop); used by run_serve, `fedsim --grpc` (kind "fedsim")
    and in-process tests. `tokens` (bearer token -> client name) replaces the job's tokens file or
    environment variable. `secret` is the coordinator's (os.urandom when None; a resumed run takes
    its checkpoint's); only the simulator passes one, to be reproducible."""
    book = TokenBook.from_names(tokens) if tokens is not None else TokenBook(load_tokens(job.server))
    host = resolve_host(job, host)
    creds = server_credentials(job.server)
    ckpt = run_dir / store.FILENAME
    if ckpt.exists() and not resume:
        raise UserError(f"{ckpt} exists from an earlier run: pass --resume to continue it, or remove {run_dir}")
    task = load_task(job.task.name, **job.task.args)
    params = initial_params(task, job.seed)
    saved = store.load_state(run_dir) if resume else None  # verified before anything is written
    record = run_record(job, run_dir, kind, task, resume)
    checkpoint = checkpointer(job, run_dir, record)
    coord = Coordinator(
        job, params, evaluate=make_evaluator(task), checkpoint=checkpoint, client_names=book.names, secret=secret
    )
    if saved is not None:
        coord.load_state_dict(saved)
        if saved["secret"] is None:
            print(no_secret_warning(int(saved["version"])), file=sys.stderr, flush=True)
        checkpoint(coord)  # results.json from the checkpoint's log (no round lost or doubled)
    server = make_grpc_server(job, book, coord)
    service = CoordinatorService(coord, job, book)
    fed_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    health_servicer = Health(job.limits.max_health_watchers)
    server.add_generic_rpc_handlers((health_servicer.handler(),))
    address = f"{host}:{job.server.port}"
    try:  # a failed bind must not leave the server's thread pool behind
        try:  # gRPC raises RuntimeError (older versions returned 0) on a failed bind
            port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise UserError(f"cannot bind gRPC to {address} (in use or not a local address)")
        mport = job.server.metrics_port
        metrics_port = metrics.serve(mport, job.server.metrics_host) if mport is not None else None
    except BaseException:
        server.stop(None)
        raise
    if creds is None:
        print(insecure_warning(host), file=sys.stderr, flush=True)
    server.start()
    atomic_write_json(
        run_dir / "endpoint.json", {"host": host, "port": port, "metrics_port": metrics_port, "tls": creds is not None}
    )
    return Running(coord, server, health_servicer, port, metrics_port, run_dir, record, service.secure)


def round_loop(run: Running, stop: threading.Event, verbose: bool = True) -> None:
    """Drive rounds until the job ends or `stop` is set."""
    coord = run.coord
    while not coord.done and not stop.is_set():
        result = run.secure.tick() if run.secure is not None else None
        result = result or coord.tick()
        if result is not None and verbose:
            e = result.entry
            acc = f" acc {e['test_accuracy']:.3f}" if "test_accuracy" in e else ""
            eps = f" eps {e['epsilon']:.3f}" if "epsilon" in e else ""
            print(
                f"round {e['round']}/{coord.job.rounds}: {e['clients']} clients{acc}{eps} "
                f"up {human_bytes(e['uplink_bytes'])} (dense {human_bytes(e['dense_bytes'])})",
                flush=True,
            )
        if result is None:
            coord.wait(0.05)


def linger(run: Running, stop: threading.Event) -> None:
    """Keep answering DONE so clients exit cleanly, until every client that joined left or linger_seconds pass."""
    run.health.set(NOT_SERVING)
    end = time.monotonic() + run.coord.job.server.linger_seconds
    while time.monotonic() < end and not stop.is_set() and run.coord.has_members():
        time.sleep(0.1)


def run_serve(args: argparse.Namespace) -> int:
    """Handler of `gradcomp serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
    job = load_fed_job(args.config, args.overrides)
    if args.port is not None:
        job.server.port = args.port
    if args.metrics_port is not None:
        job.server.metrics_port = args.metrics_port
    if getattr(args, "insecure", False):
        job.server.insecure_plaintext = True
    host = resolve_host(job, args.host)  # a plaintext bind beyond loopback fails here, --check included
    if args.check:
        print(f"{args.config}: ok (client spec: {job.client_spec()}; serves on {host})")
        return 0
    torch.set_num_threads(1)
    run_dir = Path(args.runs_dir) / job.name
    run = start(job, run_dir, resume=args.resume, host=host)
    print(
        f"gradcomp serve: job {job.name!r} on {host}:{run.port}"
        + (f", metrics on :{run.metrics_port}/metrics" if run.metrics_port else "")
        + f", run dir {run_dir}",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        round_loop(run, stop)
        linger(run, stop)
    finally:
        run.stop()
    coord = run.coord
    results = run.record.finish(status=coord.status, reason=coord.reason, rounds=coord.version)
    print_summary(results)
    wait = job.server.metrics_linger_seconds
    if run.metrics_port is not None and wait > 0 and not stop.is_set():
        print(f"gradcomp serve: /metrics stays up {wait:g} s (SIGTERM ends it)", flush=True)
        stop.wait(wait)
    if coord.status == FAILED:
        print(f"gradcomp serve: job failed: {coord.reason}", file=sys.stderr)
        return 1
    return 0
