"""gRPC channel settings both ends share: message limits, client TLS credentials, and which
addresses plaintext may use (loopback only, unless the operator opts in: docs/security.md)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from gradcomp.errors import UserError


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Send and receive limits raised to the job's `limits.max_message_bytes` (server and clients)."""
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """Client TLS: trust `ca` (system roots if None); `cert` + `key` for mutual TLS."""
    if (cert is None) != (key is None):
        raise UserError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def is_loopback_host(host: str) -> bool:
    """`host` names this machine only: localhost, 127.0.0.0/8 or ::1 (a bracketed IPv6 address too).
    Any other name counts as the network, since it may resolve anywhere."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(address: str) -> str:
    """The host of HOST, HOST:PORT, [IPV6]:PORT or a bare IPv6 address."""
    if address.startswith("["):
        return address[: address.find("]") + 1] if "]" in address else address
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_local_target(target: str) -> bool:
    """A gRPC client target that reaches this machine only: a unix socket, or loopback hosts alone
    (`host:port`, `dns:[//authority/]host:port`, `ipv4:`/`ipv6:` address lists)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return all(is_loopback_host(_host_of(a)) for a in target[len(scheme) :].split(","))
    if target.startswith("dns:"):
        target = target[len("dns:") :]
        if target.startswith("//"):  # dns://authority/host:port names its own DNS server first
            target = target[2:].partition("/")[2]
    return is_loopback_host(_host_of(target))
