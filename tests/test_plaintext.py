"""Plaintext gRPC stays on loopback unless the operator opts in, on both ends, so tokens and updates
never cross a network in clear text by accident.

`gradcomp serve` refuses a non-loopback bind without TLS (exit 2) unless `server.insecure_plaintext`
(or `--insecure`); `gradcomp client` refuses a plaintext target other than loopback (exit 2)
unless `--insecure`, before it opens a channel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradcomp.cli import main
from gradcomp.client.grpc_client import FLClient
from gradcomp.config.fed import FedJob
from gradcomp.protocol.channel import is_local_target
from gradcomp.server.app import start

JOB = {"name": "plain", "task": {"name": "digits-mlp", "args": {"hidden": 8}}, "server": {"port": 0}}


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("unix:/run/gradcomp.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.7:50051", False),
        ("coord.example.org:50051", False),
        ("localhost.example.org:50051", False),
        ("dns:///coord.example.org:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.7:2", False),  # one address beyond loopback is enough
    ],
)
def test_which_targets_are_loopback(target: str, local: bool) -> None:
    assert is_local_target(target) is local


def _job_file(tmp_path: Path, **server: object) -> str:
    path = tmp_path / f"job-{len(server)}.yaml"
    path.write_text(yaml.safe_dump(JOB | {"server": JOB["server"] | server}))
    return str(path)


def test_serve_refuses_plaintext_beyond_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job_file(tmp_path)
    assert main(["serve", "--config", job, "--host", "0.0.0.0", "--check"]) == 2
    err = capsys.readouterr().err
    assert "gradcomp serve: error: refusing to serve without TLS on 0.0.0.0" in err
    assert "server.insecure_plaintext: true (gradcomp serve --insecure)" in err
    assert main(["serve", "--config", _job_file(tmp_path, host="10.1.2.3"), "--check"]) == 2  # the job key alike
    assert "without TLS on 10.1.2.3" in capsys.readouterr().err
    assert main(["serve", "--config", job, "--host", "0.0.0.0", "--check", "--insecure"]) == 0
    assert "serves on 0.0.0.0" in capsys.readouterr().out
    assert main(["serve", "--config", job, "--check"]) == 0  # no host, no TLS: loopback
    assert "serves on 127.0.0.1" in capsys.readouterr().out


@pytest.mark.server
def test_opted_in_plaintext_binds_every_interface(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refusing to serve without TLS on 0.0.0.0"):
        start(FedJob.model_validate(JOB), tmp_path / "refused", host="0.0.0.0", tokens={"t" * 12: "a"})
    job = FedJob.model_validate(JOB | {"server": {"port": 0, "host": "0.0.0.0", "insecure_plaintext": True}})
    run = start(job, tmp_path / "run", tokens={"t" * 12: "a"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{run.port}") as channel:  # served on every interface, loopback too
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert json.loads((tmp_path / "run" / "endpoint.json").read_text())["host"] == "0.0.0.0"
    finally:
        run.stop(0)


def test_client_refuses_plaintext_beyond_loopback_before_dialing(capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.1 (TEST-NET-1) never answers: a dial would end in exit 4 after the retries, not exit 2 at once
    argv = ["client", "--server", "192.0.2.1:50051", "--token", "t" * 12, "--retry-seconds", "0", "--rpc-timeout", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "gradcomp client: error: refusing to connect without TLS to 192.0.2.1:50051" in err
    assert "--insecure" in err
    args = argparse.Namespace(server="192.0.2.1:50051", token="t" * 12, client_id="c", shard=None, tls_ca=None,
                              tls_cert=None, tls_key=None, insecure=True, quiet=True)  # fmt: skip
    FLClient(args).close()  # opted in: accepted (the channel connects lazily, so nothing is dialed)
