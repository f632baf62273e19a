"""Every Prometheus metric of gradcomp, defined once, on one module-level registry.

Conventions: prefix `gradcomp_`, base units, counters end in `_total`, bytes in `_bytes`,
durations in `_seconds`, labels only with a small fixed set of values (never a client name).

`REGISTRY` is a dedicated `CollectorRegistry` (not prometheus_client's global one), so
importing gradcomp never collides with an application's own metrics and tests can read a
value with `value("gradcomp_fed_updates_accepted_total")`. `serve(port, host)` exposes it
over HTTP at /metrics; `start(port, host)` does the same and can be closed again; `exposed(...)`
serves it for the length of a `with` block (gradcomp train and fedsim).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from gradcomp.errors import UserError

REGISTRY = CollectorRegistry(auto_describe=True)

# Why an update was refused (label `reason` of gradcomp_fed_updates_rejected_total).
REJECT_REASONS = (
    "unauthenticated",
    "stale_round",
    "not_selected",
    "duplicate",
    "too_large",
    "malformed",
    "bad_shape",
    "bad_dtype",
    "non_finite",
    "job_done",
)

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# --- federated coordinator (server/) and simulation (sim/) -----------------------------------
FED_ROUND = Gauge("gradcomp_fed_round", "Rounds completed so far (version of the global model)", registry=REGISTRY)
FED_ROUNDS_COMPLETED = Counter(
    "gradcomp_fed_rounds_completed", "Rounds aggregated into the global model", registry=REGISTRY
)
FED_ROUND_RETRIES = Counter(
    "gradcomp_fed_round_retries", "Rounds retried because fewer than round.min_clients reported", registry=REGISTRY
)
FED_CLIENTS_CONNECTED = Gauge(
    "gradcomp_fed_clients_connected",
    "Clients heard from (any authenticated call) within server.liveness_seconds, counted at each scrape "
    "(over the newest coordinator in the process)",
    registry=REGISTRY,
)
FED_CLIENTS_BENCHED = Gauge(
    "gradcomp_fed_clients_benched",
    "Clients left out of selection after round.bench_after_misses consecutive missed rounds",
    registry=REGISTRY,
)
FED_CLIENTS_SELECTED = Gauge(
    "gradcomp_fed_clients_selected", "Clients selected for the current round", registry=REGISTRY
)
FED_CLIENTS_REPORTED = Gauge(
    "gradcomp_fed_clients_reported", "Accepted updates in the current round so far", registry=REGISTRY
)
FED_UPDATES_ACCEPTED = Counter(
    "gradcomp_fed_updates_accepted", "Client updates accepted into a round", registry=REGISTRY
)
FED_UPDATES_REJECTED = Counter(
    "gradcomp_fed_updates_rejected", "Client updates refused, by reason", ["reason"], registry=REGISTRY
)
FED_UPDATES_CLIPPED = Counter(
    "gradcomp_fed_updates_clipped",
    "Accepted updates scaled down to limits.max_update_norm (their L2 norm was above it)",
    registry=REGISTRY,
)
FED_UPLINK_BYTES = Counter(
    "gradcomp_fed_uplink_bytes", "Compressed update bytes received from clients (accepted)", registry=REGISTRY
)
FED_UPLINK_DENSE_BYTES = Counter(
    "gradcomp_fed_uplink_dense_bytes",
    "What the accepted updates would have cost uncompressed (dense float)",
    registry=REGISTRY,
)
FED_DOWNLINK_BYTES = Counter(
    "gradcomp_fed_downlink_bytes", "Global-model bytes sent to clients (chunks served)", registry=REGISTRY
)
FED_DOWNLINK_DENSE_BYTES = Counter(
    "gradcomp_fed_downlink_dense_bytes",
    "Dense-equivalent global-model bytes sent to clients (the model is sent dense)",
    registry=REGISTRY,
)
FED_AGGREGATE_SECONDS = Histogram(
    "gradcomp_fed_aggregate_duration_seconds",
    "Time to aggregate a round's updates and apply the server strategy",
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
FED_ROUND_SECONDS = Histogram(
    "gradcomp_fed_round_duration_seconds",
    "Time from a round's start to its aggregation",
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
FED_TEST_LOSS = Gauge("gradcomp_fed_global_test_loss", "Test loss of the global model", registry=REGISTRY)
FED_TEST_ACCURACY = Gauge(
    "gradcomp_fed_global_test_accuracy", "Test accuracy of the global model (0..1)", registry=REGISTRY
)
FED_EPSILON = Gauge(
    "gradcomp_fed_privacy_epsilon",
    "Client-level epsilon spent (at the job's delta; local DP: the worst client's, q = 1)",
    registry=REGISTRY,
)
FED_RPCS = Counter(
    "gradcomp_fed_rpcs", "Coordinator RPCs handled, by method and gRPC status code", ["method", "code"],
    registry=REGISTRY,
)  # fmt: skip
# Secure aggregation over gRPC (server/secure_session.py): phase = advertise | share | masked | unmask.
SECAGG_PHASES = ("advertise", "share", "masked", "unmask")
FED_SECAGG_PHASE_SECONDS = Histogram(
    "gradcomp_fed_secagg_phase_duration_seconds",
    "Time a SecAgg+ phase of a secure round stayed open (advertise includes local training)",
    ["phase"],
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
FED_SECAGG_UNMASK_SECONDS = Histogram(
    "gradcomp_fed_secagg_unmask_duration_seconds",
    "Coordinator time to rebuild the secrets and unmask a secure round's sum",
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
FED_SECAGG_DROPOUTS_RECOVERED = Counter(
    "gradcomp_fed_secagg_dropouts_recovered",
    "Clients that dropped after sharing their keys in a secure round whose sum was still unmasked",
    registry=REGISTRY,
)
FED_SECAGG_ABORTED = Counter(
    "gradcomp_fed_secagg_rounds_aborted",
    "Secure-round attempts aborted without unmasking (too few survivors, holders, or a split graph)",
    registry=REGISTRY,
)


# --- data-parallel training (gradcomp train; set on the driver from the workers' progress events) ---
# Labels: `run` (the job name) and, for what each worker measures itself, `rank` (0..workers-1).
def _per_rank(kind: type, name: str, doc: str, **kw: Any) -> Any:
    return kind(name, doc, ("run", "rank"), registry=REGISTRY, **kw)


def _per_run(kind: type, name: str, doc: str) -> Any:
    return kind(name, doc, ("run",), registry=REGISTRY)


TRAIN_STEPS = _per_rank(Counter, "gradcomp_train_steps", "Optimizer steps taken")
TRAIN_EXAMPLES = _per_rank(
    Counter,
    "gradcomp_train_examples",
    "Training examples processed; under DP-SGD the expected batch per step (the drawn Poisson sizes stay "
    "in the workers unless dp.unprotected_metrics)",
)
TRAIN_BYTES_SENT = _per_rank(
    Counter, "gradcomp_train_bytes_sent", "Gradient bytes this rank sent in collectives (compressed)"
)
TRAIN_DENSE_BYTES = _per_rank(
    Counter, "gradcomp_train_dense_bytes", "What the same steps would have sent with dense all-reduce"
)
TRAIN_COMPRESSION_RATIO = _per_rank(
    Gauge, "gradcomp_train_compression_ratio", "Dense-equivalent / sent bytes of the last step"
)
TRAIN_STEP_SECONDS = _per_rank(
    Histogram,
    "gradcomp_train_step_duration_seconds",
    "Time of one training step: forward, backward, compressed collectives, optimizer",
    buckets=_DURATION_BUCKETS,
)
TRAIN_LOSS = _per_rank(
    Gauge,
    "gradcomp_train_loss",
    "Training loss of the last step's minibatch on this rank (not under DP-SGD unless dp.unprotected_metrics)",
)
TRAIN_EPOCH = _per_run(Gauge, "gradcomp_train_epoch", "Epochs completed")
TRAIN_TEST_ACCURACY = _per_run(Gauge, "gradcomp_train_test_accuracy", "Test accuracy at the last evaluation (0..1)")
TRAIN_TEST_LOSS = _per_run(Gauge, "gradcomp_train_test_loss", "Test loss at the last evaluation")
TRAIN_LEARNING_RATE = _per_run(
    Gauge, "gradcomp_train_learning_rate", "Learning rate after the last step (schedule applied)"
)
TRAIN_EPSILON = _per_run(
    Gauge, "gradcomp_train_privacy_epsilon", "Example-level epsilon spent (at dp.delta); exported only with DP"
)
TRAIN_RESTORES = _per_run(Counter, "gradcomp_train_restores", "Times the workers restarted from a checkpoint")

for _reason in REJECT_REASONS:  # export every reason at 0 so dashboards and rate() see them from the start
    FED_UPDATES_REJECTED.labels(reason=_reason)
for _phase in SECAGG_PHASES:  # likewise every SecAgg+ phase, before any secure round ran
    FED_SECAGG_PHASE_SECONDS.labels(phase=_phase)


def value(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a sample (e.g. `gradcomp_fed_updates_accepted_total`), 0.0 if absent."""
    got = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if got is None else float(got)


def metric_names() -> list[str]:
    """Names of every metric family gradcomp exports (for docs and tests)."""
    return sorted(m.name + "_total" if m.type == "counter" else m.name for m in REGISTRY.collect())


@dataclass(frozen=True)
class Endpoint:
    """A running /metrics server: the port it bound and how to stop it."""

    port: int
    close: Callable[[], None]


MAX_SCRAPES = 8  # /metrics requests served at once; more are closed at once
SCRAPE_TIMEOUT = 10.0  # seconds a connection may take to send its request (and to read the answer)


class _Quiet(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT  # a half-sent request no longer holds its thread for good

    def log_message(self, format: str, *args: Any) -> None:
        return


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server with at most MAX_SCRAPES request threads (prometheus_client's own
    server starts a thread per connection, without a timeout)."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any):
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a scrape that timed out or hung up: nothing to report

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start(port: int, host: str = "127.0.0.1") -> Endpoint:
    """Expose REGISTRY at http://host:port/metrics in a daemon thread (port 0: any free port)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
    server: _BoundedServer = make_server(host, port, make_wsgi_app(REGISTRY), server_class, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return Endpoint(int(server.server_address[1]), close)


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Expose REGISTRY at http://host:port/metrics for the life of the process; returns the bound port."""
    return start(port, host).port


@contextmanager
def exposed(
    port: int | None, host: str = "127.0.0.1", linger: float = 0.0, who: str = "gradcomp"
) -> Iterator[int | None]:
    """Serve REGISTRY while the block runs; yields the bound port (None, and nothing served, if port is None).

    After a normal end the endpoint stays up `linger` seconds, so that Prometheus scrapes the
    final values of a short run. A port that cannot be bound is a ValueError (a user error).
    """
    if port is None:
        yield None
        return
    try:
        endpoint = start(port, host)
    except OSError as err:  # in use, or not an address of this machine
        raise UserError(f"--metrics-port {port}: cannot serve on {host}: {err.strerror or err}") from None
    print(f"{who}: metrics on http://{host}:{endpoint.port}/metrics", file=sys.stderr, flush=True)
    try:
        yield endpoint.port
        if linger > 0:
            print(f"{who}: /metrics stays up {linger:g} s", file=sys.stderr, flush=True)
            time.sleep(linger)
    finally:
        endpoint.close()
