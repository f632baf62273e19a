"""The standard gRPC health service (grpc.health.v1.Health), served without a token and bounded.

Probes (load balancers, `deploy/healthcheck.py`) call it with no token, so anyone can. grpcio's
own `HealthServicer` was unsafe to expose that way:

- it reads the request, and gRPC buffers a whole message before the handler sees it: an
  anonymous caller could send requests of twice `limits.max_message_bytes` and make the
  coordinator hold them (16 x 60 MB grew it by 717 MiB). This service never reads its request:
  the bytes stay in HTTP/2 flow control (one stream window) and are dropped with the call. So it
  cannot tell which service a caller names, and answers the coordinator's status for any name
  (the coordinator serves "" and gradcomp.v1.Coordinator, always with the same status);
- `Watch` streams were unbounded (20,000 anonymous streams cost 397 MiB). Here at most
  `max_watchers` are open at once; one more is refused with RESOURCE_EXHAUSTED;
- `set()` called into gRPC while holding its lock, and gRPC's event thread took the same lock in
  a stream's close callback: a Watch cancelled while the job ended deadlocked the shutdown. Here
  no gRPC call is made under the lock, status changes reach watchers from a separate thread (a
  watcher that does not read cannot block the caller), and `close()` makes no gRPC call at all:
  the server's stop cancels the streams.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

SERVICE = "grpc.health.v1.Health"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Send = Callable[[Any], None]


class Health:
    """Serving status of the whole server, answered to anyone without reading their request."""

    def __init__(self, max_watchers: int):
        self.max_watchers = max_watchers
        self._lock = threading.Lock()
        self._status = SERVING
        self._closed = False
        self._watchers: set[Send] = set()

    @property
    def watchers(self) -> int:
        with self._lock:
            return len(self._watchers)

    def set(self, status: int) -> None:
        """The status every call from now on gets; open Watch streams are told from another thread."""
        with self._lock:
            if self._closed or status == self._status:
                return
            self._status = status
            targets = list(self._watchers)
        if targets:
            reply = health_pb2.HealthCheckResponse(status=status)
            threading.Thread(target=_tell, args=(targets, reply), name="health-notify", daemon=True).start()

    def close(self) -> None:
        """NOT_SERVING for every later call; open streams are left to the server's stop to cancel."""
        with self._lock:
            self._closed, self._status = True, NOT_SERVING
            self._watchers.clear()

    # --- handlers: request-streaming, so the request is never read ---------------------------
    def _check(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with self._lock:
            return health_pb2.HealthCheckResponse(status=self._status)

    def _watch(self, requests: Iterator[bytes], context: grpc.ServicerContext, send_response_callback: Send) -> None:
        send = send_response_callback
        with self._lock:
            full = len(self._watchers) >= self.max_watchers
            if not full:
                self._watchers.add(send)
            status = self._status
        if full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watchers} health Watch streams are open already (limits.max_health_watchers)",
            )
        context.add_callback(lambda: self._forget(send))
        send(health_pb2.HealthCheckResponse(status=status))

    def _forget(self, send: Send) -> None:
        with self._lock:  # runs on gRPC's event thread: take the lock only, never call into gRPC here
            self._watchers.discard(send)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a server (`server.add_generic_rpc_handlers((h,))`)."""
        # grpcio reads this flag off the handler function; typing knows no such attribute
        self._watch.__func__.experimental_non_blocking = True  # type: ignore[attr-defined]
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.stream_unary_rpc_method_handler(
                    self._check, response_serializer=health_pb2.HealthCheckResponse.SerializeToString
                ),
                "Watch": grpc.stream_stream_rpc_method_handler(
                    self._watch, response_serializer=health_pb2.HealthCheckResponse.SerializeToString
                ),
            },
        )


def _tell(targets: list[Send], reply: health_pb2.HealthCheckResponse) -> None:
    for send in targets:
        try:
            send(reply)
        except Exception:  # a stream that ended meanwhile; the others still hear
            continue
