"""TLS material and bearer tokens.

`python -m gradcomp.server.tls --out certs --host coord.example.org --clients 3` writes a
private CA (ca.pem), a server certificate for the given hosts (server.pem / server.key) and,
with --clients N, client certificates for mutual TLS (client-I.pem / client-I.key), plus a
tokens file (tokens.txt: 'client-I <random token>' lines). Needs the `cryptography` package.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from gradcomp.config.fed import ServerSection


# --- tokens ------------------------------------------------------------------------------------
def parse_tokens_text(text: str, source: str) -> dict[str, str]:
    """'name token' lines (or 'name=token' items separated by commas) -> {token: name}."""
    out: dict[str, str] = {}
    items = [ln for ln in text.replace(",", "\n").splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for i, raw in enumerate(items, 1):
        parts = raw.replace("=", " ").split()
        if len(parts) != 2:
            raise ValueError(f"{source}: entry {i} must be 'client-name token', got {raw.strip()!r}")
        name, token = parts
        if len(token) < 8:
            raise ValueError(f"{source}: token of {name!r} is shorter than 8 characters")
        if token in out:
            raise ValueError(f"{source}: clients {out[token]!r} and {name!r} share a token")
        if name in out.values():
            raise ValueError(f"{source}: client {name!r} has two tokens")
        out[token] = name
    return out


def load_tokens(server: ServerSection) -> dict[str, str]:
    """Tokens from server.tokens_file, else from the env var server.tokens_env."""
    if server.tokens_file is not None:
        path = Path(server.tokens_file)
        if not path.is_file():
            raise FileNotFoundError(f"server.tokens_file: {path} does not exist")
        tokens = parse_tokens_text(path.read_text(), str(path))
    else:
        tokens = parse_tokens_text(os.environ.get(server.tokens_env, ""), f"${server.tokens_env}")
    if not tokens:
        raise ValueError(
            f"no client tokens: set server.tokens_file (lines 'client-name token') or "
            f"${server.tokens_env}='name=token,name=token' (generate some with python -m gradcomp.server.tls)"
        )
    return tokens


# --- gRPC credentials ---------------------------------------------------------------------------
def server_credentials(server: ServerSection) -> grpc.ServerCredentials | None:
    if server.tls_cert is None or server.tls_key is None:
        return None
    ca = Path(server.tls_client_ca).read_bytes() if server.tls_client_ca else None
    pair = (Path(server.tls_key).read_bytes(), Path(server.tls_cert).read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


# --- certificate generation ----------------------------------------------------------------------
def generate(out: str | Path, hosts: Sequence[str], clients: int = 0, days: int = 365) -> dict[str, Path]:
    """Write a CA, a server cert for `hosts` and `clients` client certs + tokens; returns the paths."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as err:  # pragma: no cover
        raise RuntimeError("generating certificates needs `pip install cryptography` (or use openssl)") from err

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    paths: dict[str, Path] = {}

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("gradcomp CA"))
        .issuer_name(name("gradcomp CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths["ca"] = out / "ca.pem"
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, sans: Sequence[str], usage: x509.ObjectIdentifier, stem: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for h in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[f"{stem}_cert"] = out / f"{stem}.pem"
        paths[f"{stem}_key"] = out / f"{stem}.key"
        paths[f"{stem}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, paths[f"{stem}_key"])

    leaf(hosts[0], hosts, ExtendedKeyUsageOID.SERVER_AUTH, "server")
    lines = []
    for i in range(clients):
        leaf(f"client-{i}", [], ExtendedKeyUsageOID.CLIENT_AUTH, f"client-{i}")
        lines.append(f"client-{i} {secrets.token_urlsafe(24)}")
    if clients:
        paths["tokens"] = out / "tokens.txt"
        paths["tokens"].write_text("\n".join(lines) + "\n")
        paths["tokens"].chmod(0o600)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradcomp.server.tls", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="certs", help="directory to write into")
    p.add_argument("--host", action="append", default=[], help="DNS name or IP of the coordinator (repeatable)")
    p.add_argument("--clients", type=int, default=0, help="also write N client certificates and a tokens file")
    p.add_argument("--days", type=int, default=365)
    args = p.parse_args(argv)
    paths = generate(args.out, args.host or ["localhost", "127.0.0.1"], args.clients, args.days)
    for key, path in paths.items():
        print(f"{key:>16}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
