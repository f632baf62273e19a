"""gRPC channel settings both ends share: message limits and client TLS credentials."""

from __future__ import annotations

from pathlib import Path

import grpc


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Send and receive limits raised to the job's `limits.max_message_bytes` (server and clients)."""
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """Client TLS: trust `ca` (system roots if None); `cert` + `key` for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
