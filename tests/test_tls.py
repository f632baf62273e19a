"""TLS material from `python -m gradcomp.server.tls`: private keys and tokens are owner-only from the start."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gradcomp.server import tls
from gradcomp.server.auth import parse_tokens_text
from gradcomp.server.tls import generate, write_secret


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():  # type: ignore[no-untyped-def]
    """umask 000: a file written without an explicit mode would be world-readable."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_keys_and_tokens_are_0600_before_they_get_their_name(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes_at_rename: dict[str, int] = {}
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        modes_at_rename[Path(dst).name] = _mode(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(tls.os, "replace", replace)
    paths = generate(tmp_path / "certs", ["coord.example.org", "10.0.0.5"], clients=2)
    secret = {"server_key", "client-0_key", "client-1_key", "tokens"}
    assert set(modes_at_rename) == {paths[k].name for k in secret}
    assert set(modes_at_rename.values()) == {0o600}
    for key, path in paths.items():
        assert _mode(path) == (0o600 if key in secret else 0o666), key  # certificates are public
    assert sorted(os.listdir(tmp_path / "certs")) == sorted(p.name for p in paths.values())  # no temp files left
    tokens = parse_tokens_text(paths["tokens"].read_text(), "tokens.txt")
    assert sorted(c.name for c in tokens.values()) == ["client-0", "client-1"]
    assert all(c.cert_identity == c.name for c in tokens.values())  # each token bound to its certificate's CN


def test_certificates_name_the_hosts_and_usages(tmp_path: Path) -> None:
    paths = generate(tmp_path, ["coord.example.org", "10.0.0.5"], clients=1)
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    client = x509.load_pem_x509_certificate(paths["client-0_cert"].read_bytes())
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert server.subject.rfc4514_string() == "CN=coord.example.org"
    assert client.subject.rfc4514_string() == "CN=client-0"
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)


def test_write_secret_narrows_an_existing_world_readable_file(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "old.key"
    path.write_text("old")
    path.chmod(0o644)
    write_secret(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o600


@pytest.mark.server
def test_a_client_refuses_a_coordinator_whose_certificate_its_ca_did_not_sign(tmp_path: Path) -> None:
    """Someone answering on the coordinator's address with a certificate of their own (another CA)
    is refused at the handshake; the same client reaches the real coordinator."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from gradcomp.config.serve import ServerSection
    from gradcomp.protocol.channel import channel_credentials

    real = generate(tmp_path / "real", ["localhost", "127.0.0.1"])
    impostor = generate(tmp_path / "impostor", ["localhost", "127.0.0.1"])

    def serve(certs: dict[str, Path]) -> tuple[grpc.Server, int]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        creds = tls.server_credentials(ServerSection(tls_cert=certs["server_cert"], tls_key=certs["server_key"]))
        assert creds is not None
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        return server, port

    def check(port: int) -> grpc.StatusCode:
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(str(real["ca"]))) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    for certs, expected in ((real, grpc.StatusCode.OK), (impostor, grpc.StatusCode.UNAVAILABLE)):
        server, port = serve(certs)
        try:
            assert check(port) == expected
        finally:
            server.stop(None)
