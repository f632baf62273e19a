"""gRPC server options that bound what a peer can hold on the coordinator without a token.

- Buffering: the receive limit is twice `limits.max_message_bytes` so that the auth gate, not
  gRPC, sees (and counts) an oversized request; gRPC's own refusal reaches a handler only as a
  cancelled call. HTTP/2's bandwidth-delay probing is off and the stream window fixed: with
  probing on, a flood of unauthenticated requests grew the window and the coordinator buffered
  megabytes per stream before the refusal went out. Streams per connection are capped.
- Connections: 1,015 idle connections once took all 1,024 file handles of the process, and an
  honest client's Join timed out while they stayed. Now the soft file limit is raised to the
  hard one, connections are capped below it (`grpc.max_allowed_incoming_connections`, enforced
  before the handshake), a handshake must end within `limits.handshake_seconds`, and a
  connection is closed after `limits.connection_idle_seconds` without a call and at
  `limits.connection_age_seconds`. Pings: the coordinator pings an idle peer to find dead ones;
  a peer that pings more often than every 10 s, or without calls, is sent GOAWAY.
"""

from __future__ import annotations

import logging

from gradcomp.config.serve import LimitsSection

log = logging.getLogger("gradcomp.server")

FD_RESERVE = 64  # file handles kept for everything but connections: checkpoints, logs, /metrics, threads
UNLIMITED = 1 << 20
STREAMS_PER_CONNECTION = 32  # an honest client keeps 2 calls open (its loop and its heartbeat)


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where it is lower; the soft limit after."""
    try:
        import resource
    except ImportError:  # not POSIX: no limit to raise or to fit connections under
        return UNLIMITED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, err)
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def connection_cap(limits: LimitsSection, file_limit: int) -> int:
    """`limits.max_connections`, lowered to fit under `file_limit` with FD_RESERVE handles to spare."""
    room = max(1, file_limit - FD_RESERVE)
    if limits.max_connections > room:
        log.warning("limits.max_connections %d does not fit the open-file limit %d: capping connections at %d",
                    limits.max_connections, file_limit, room)  # fmt: skip
    return min(limits.max_connections, room)


def server_options(limits: LimitsSection, max_connections: int) -> list[tuple[str, int]]:
    """The options of the coordinator's gRPC server (see module docstring)."""
    ms = lambda seconds: max(1, int(seconds * 1000))  # noqa: E731
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", 2 * limits.max_message_bytes),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", limits.stream_window_bytes),
        ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
        ("grpc.so_reuseport", 0),  # a second coordinator on the same port must fail, not share the clients
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", ms(limits.handshake_seconds)),
        ("grpc.max_connection_idle_ms", ms(limits.connection_idle_seconds)),
        ("grpc.max_connection_age_ms", ms(limits.connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", ms(limits.rpc_timeout_seconds)),  # calls in flight may finish
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]
