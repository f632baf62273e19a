"""TLS material and bearer tokens.

`python -m gradcomp.server.tls --out certs --host coord.example.org --clients 3` writes a
private CA (ca.pem), a server certificate for the given hosts (server.pem / server.key) and,
with --clients N, client certificates for mutual TLS (client-I.pem / client-I.key, CN client-I),
plus a tokens file (tokens.txt: 'client-I <random token> client-I' lines: name, token, and the
certificate identity the token is bound to; see server/auth.py). Keys and tokens are written 0600.
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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gradcomp.config.serve import ServerSection


# --- gRPC credentials ---------------------------------------------------------------------------
def server_credentials(server: ServerSection) -> grpc.ServerCredentials | None:
    if server.tls_cert is None or server.tls_key is None:
        return None
    ca = Path(server.tls_client_ca).read_bytes() if server.tls_client_ca else None
    pair = (Path(server.tls_key).read_bytes(), Path(server.tls_cert).read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


# --- certificate generation ----------------------------------------------------------------------
def write_secret(path: str | Path, data: bytes) -> None:
    """Write a private key or token file that is owner-only (0600) from its first byte.

    The bytes go into a new file opened with mode 0600 (never a file first created with the
    umask's mode and narrowed after), then replace `path` in one rename.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _valid_for(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("gradcomp CA"))
        .issuer_name(_name("gradcomp CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    return key, _valid_for(builder, days).sign(key, hashes.SHA256())


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    return alt


def _write_leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    out: Path,
    stem: str,
    common_name: str,
    sans: Sequence[str],
    usage: x509.ObjectIdentifier,
    days: int,
) -> dict[str, Path]:
    """A key and a certificate signed by `ca`, for `common_name` and the `sans` hosts: out/<stem>.pem, .key."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_subject_alt_names(sans)), critical=False)
    cert = _valid_for(builder, days).sign(ca_key, hashes.SHA256())
    paths = {f"{stem}_cert": out / f"{stem}.pem", f"{stem}_key": out / f"{stem}.key"}
    paths[f"{stem}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(paths[f"{stem}_key"], pkcs8)
    return paths


def generate(out: str | Path, hosts: Sequence[str], clients: int = 0, days: int = 365) -> dict[str, Path]:
    """Write a CA, a server cert for `hosts` and `clients` client certs + tokens; returns the paths.

    Private keys and the tokens file are owner-only (0600); certificates are public.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(days)
    paths = {"ca": out / "ca.pem"}
    paths["ca"].write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    paths.update(_write_leaf(ca, out, "server", hosts[0], hosts, ExtendedKeyUsageOID.SERVER_AUTH, days))
    lines = []
    for i in range(clients):
        paths.update(_write_leaf(ca, out, f"client-{i}", f"client-{i}", [], ExtendedKeyUsageOID.CLIENT_AUTH, days))
        lines.append(f"client-{i} {secrets.token_urlsafe(24)} client-{i}")
    if clients:
        paths["tokens"] = out / "tokens.txt"
        write_secret(paths["tokens"], ("\n".join(lines) + "\n").encode())
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
