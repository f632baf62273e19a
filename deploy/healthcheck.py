#!/usr/bin/env python3
"""Ask a gRPC server's standard health service (grpc.health.v1.Health/Check) whether it serves.

Why this exists: the kubelet's built-in `grpc:` probe dials in plaintext, so it cannot check a
coordinator that serves TLS (let alone mutual TLS). This probe speaks the same health protocol
over TLS/mTLS; deploy/k8s uses it as an exec probe. Exit status 0 = SERVING, 1 = anything else.

    gradcomp-healthcheck --address 127.0.0.1:50051 --tls-ca ca.crt --tls-cert tls.crt --tls-key tls.key
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradcomp-healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    p.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="RPC deadline in seconds")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA that signed the server certificate (enables TLS)")
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="client key (mutual TLS)")
    p.add_argument("--server-name", default=None, help="name to verify in the server certificate (default: host)")
    return p


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """Run one Health/Check; return (serving, human-readable status)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        raise ValueError("--tls-cert/--tls-key need --tls-ca")
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    if args.tls_ca is None:
        channel = grpc.insecure_channel(args.address, options=options)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca.read_bytes(),
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        channel = grpc.secure_channel(args.address, creds, options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            return False, f"{args.address}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{args.address}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ok, message = check(args)
    except (ValueError, OSError) as err:
        print(f"gradcomp-healthcheck: error: {err}", file=sys.stderr)
        return 2
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
