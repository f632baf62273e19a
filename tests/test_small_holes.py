"""Smaller holes in authentication, the client's terminal, /metrics and run directories.

Tokens are taken whole (an '=' inside one is part of it), weak tokens and a tokens file others may
read are warned about, wrong tokens are throttled per address and logged; text from a coordinator
is shown with its control characters escaped; /metrics binds loopback by default and holds at most
a few threads, each with a timeout; a run name cannot leave --runs-dir; the client's token can come
from a file or the environment instead of its command line.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from test_client_hostile import FakeCoordinator, Scenario
from test_client_work_limits import client_args, coordinator  # noqa: F401 - the fake coordinator's fixture

from gradcomp import metrics
from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.cli import build_parser
from gradcomp.client.credentials import TokenError, printable, resolve_token
from gradcomp.client.grpc_client import FLClient
from gradcomp.config.fed import FedJob
from gradcomp.config.train import TrainJob
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.server.app import start
from gradcomp.server.auth import load_tokens, parse_tokens_text

Code = grpc.StatusCode
EQ_TOKEN = "Pr3fix99=rest-of-the-token-xyz"


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def job(tmp: Path, tokens: str) -> FedJob:
    path = tmp / "tokens.txt"
    path.write_text(tokens)
    path.chmod(0o600)
    return FedJob.model_validate({
        "name": "holes",
        "task": {"name": "synthetic", "args": {"num_params": 2000, "num_examples": 64, "input_dim": 16}},
        "rounds": 10, "clients": {"expected": 2, "min": 2},
        "server": {"port": 0, "tokens_file": str(path), "linger_seconds": 0},
    })  # fmt: skip


# --- tokens -----------------------------------------------------------------------------------------
def test_a_token_with_an_equals_sign_is_taken_whole(tmp_path: Path) -> None:
    assert {t: i.name for t, i in parse_tokens_text(f"alice {EQ_TOKEN}\n", "f").items()} == {EQ_TOKEN: "alice"}
    assert {t: i.name for t, i in parse_tokens_text(f"alice={EQ_TOKEN},bob=bob-token-0123456789", "$E").items()} == {
        EQ_TOKEN: "alice", "bob-token-0123456789": "bob"}  # fmt: skip
    run = start(job(tmp_path, f"alice {EQ_TOKEN}\nbob bob-token-0123456789\n"), tmp_path / "run")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{run.port}") as ch:
            stub = fed_pb2_grpc.CoordinatorStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Join(fed_pb2.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=md("Pr3fix99"), timeout=5)
            assert err.value.code() == Code.UNAUTHENTICATED
            joined = stub.Join(fed_pb2.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=md(EQ_TOKEN), timeout=5)
            assert joined.client_name == "alice"
    finally:
        run.stop(0)


def test_weak_tokens_and_a_readable_tokens_file_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text("alice aaaaaaaa\nbob Zk3-9qLm_x81VwPa\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="gradcomp.server"):
        tokens = load_tokens(FedJob.model_validate({"server": {"tokens_file": str(path)}}).server)
    assert len(tokens) == 2
    text = caplog.text
    assert "'alice'" in text and "weak" in text and "'bob'" not in text
    assert "readable by other users" in text and "aaaaaaaa" not in text  # never the token itself


def test_wrong_tokens_are_throttled_per_address_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """200 wrong tokens as fast as one channel sends them: about 30 (the burst) plus 2 a second are
    checked, the rest refused RESOURCE_EXHAUSTED unchecked; a valid token from the same address waits too."""
    run = start(job(tmp_path, "alice alice-token-0123456789\nbob bob-token-0123456789\n"), tmp_path / "run")
    try:
        with (
            caplog.at_level(logging.WARNING, logger="gradcomp.server"),
            grpc.insecure_channel(f"127.0.0.1:{run.port}") as ch,
        ):
            stub = fed_pb2_grpc.CoordinatorStub(ch)
            codes, began = [], time.monotonic()
            for i in range(200):
                try:
                    stub.Heartbeat(fed_pb2.HeartbeatRequest(), metadata=md(f"guess-{i:08d}-abcdef"), timeout=5)
                except grpc.RpcError as err:
                    codes.append(err.code())
            elapsed = time.monotonic() - began
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(fed_pb2.HeartbeatRequest(), metadata=md("alice-token-0123456789"), timeout=5)
            assert err.value.code() == Code.RESOURCE_EXHAUSTED and "failed authentications" in err.value.details()
            time.sleep(1.0)  # two tokens back in the bucket
            stub.Heartbeat(fed_pb2.HeartbeatRequest(), metadata=md("alice-token-0123456789"), timeout=5)
        checked = codes.count(Code.UNAUTHENTICATED)
        assert set(codes) == {Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED}
        assert 30 <= checked <= 31 + 2 * elapsed, (checked, elapsed)
        assert "unauthenticated call to Heartbeat from ipv4:127.0.0.1" in caplog.text
    finally:
        run.stop(0)


# --- the client's terminal ----------------------------------------------------------------------------------
def test_printable_escapes_control_characters() -> None:
    assert printable("ok\x1b[2J\nfake line\r\u202egnp.exe") == "ok\\x1b[2J\\nfake line\\r\\u202egnp.exe"
    assert printable("x" * 600).endswith("... (100 more characters)")


def test_coordinator_text_reaches_the_terminal_escaped(
    coordinator: tuple[FakeCoordinator, int],  # noqa: F811 - the imported fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, port = coordinator
    done = fed_pb2.PullTaskResponse(action=fed_pb2.PullTaskResponse.DONE, message="bye\r\x1b[2Kforged\n")
    fake.scenario = scenario = Scenario(task=done)
    scenario.join.client_name = "c0\x1b[31m\n[client c0] round 9: update accepted"
    assert FLClient(client_args(port, quiet=False)).run() == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert all(line.startswith("[client ") for line in out.splitlines()), out
    assert "c0\\x1b[31m\\n[client c0] round 9" in out and "bye\\r\\x1b[2Kforged\\n" in out


# --- the client's token --------------------------------------------------------------------------------------
def test_the_token_comes_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parse = build_parser().parse_args
    path = tmp_path / "token"
    path.write_text("file-token-0123456789\n")
    path.chmod(0o600)
    assert resolve_token(parse(["client", "--server", "h:1", "--token-file", str(path)])) == (
        "file-token-0123456789",
        [],
    )
    path.chmod(0o644)
    assert (
        "readable by other users"
        in resolve_token(parse(["client", "--server", "h:1", "--token-file", str(path)]))[1][0]
    )
    monkeypatch.setenv("GRADCOMP_TOKEN", "env-token-0123456789")
    assert resolve_token(parse(["client", "--server", "h:1"])) == ("env-token-0123456789", [])
    token, warnings = resolve_token(parse(["client", "--server", "h:1", "--token", "cli-token-0123456789"]))
    assert token == "cli-token-0123456789" and "process list" in warnings[0]
    monkeypatch.delenv("GRADCOMP_TOKEN")
    with pytest.raises(TokenError):
        resolve_token(parse(["client", "--server", "h:1"]))


# --- /metrics ------------------------------------------------------------------------------------------------
def test_metrics_bind_loopback_by_default(tmp_path: Path) -> None:
    assert FedJob().server.metrics_host == "127.0.0.1"
    data = job(tmp_path, "alice alice-token-0123456789\n").model_dump(mode="json")
    data["server"] |= {"host": "0.0.0.0", "insecure_plaintext": True, "metrics_port": 0}
    run = start(FedJob.model_validate(data), tmp_path / "run")
    try:
        assert _listening_on(run.metrics_port) == {"127.0.0.1"}
    finally:
        run.stop(0)


def _listening_on(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on `port` (/proc/net/tcp: hex address:port, state 0A)."""
    table = Path("/proc/net/tcp")
    if not table.is_file():
        pytest.skip("needs /proc/net/tcp")
    found = set()
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


def test_half_sent_scrapes_hold_a_bounded_number_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics._Quiet, "timeout", 1.0)
    endpoint = metrics.start(0, "127.0.0.1")
    before = threading.active_count()
    stalled = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
            s.sendall(b"GET /metr")  # never finishes its request line
            stalled.append(s)
        time.sleep(0.3)
        assert threading.active_count() - before <= metrics.MAX_SCRAPES
        end, body = time.monotonic() + 15, None
        while body is None and time.monotonic() < end:  # the stalled ones time out; a scrape gets through
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=2).read()
            except OSError:
                time.sleep(0.2)
        assert body is not None and b"gradcomp_fed_round" in body
    finally:
        for s in stalled:
            s.close()
        endpoint.close()


# --- run directories ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "../elsewhere", "a/b", ".hidden", ""])
def test_a_run_name_cannot_leave_the_runs_dir(name: str) -> None:
    with pytest.raises(ValidationError):
        FedJob.model_validate({"name": name})
    with pytest.raises(ValidationError):
        TrainJob.model_validate({"name": name})
