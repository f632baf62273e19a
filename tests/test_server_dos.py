"""What a peer with no token, or with one token, can hold on the coordinator; real gRPC on 127.0.0.1.

- The health service answers without a token and never reads its request: anonymous 16 MiB
  Health/Check calls do not grow the coordinator, Watch streams are capped, and a SIGTERM
  while Watch streams are being cancelled still ends the process and writes its final status.
- Idle connections (raw TCP, and HTTP/2 that never calls) cannot take the coordinator's file
  handles: connections are capped below the file limit and dropped after the handshake timeout
  and the idle timeout, so an honest Join gets through.
- One token whose requests never send their body holds at most `limits.max_calls_per_client`
  calls, each only until `limits.request_read_seconds`; another client is served meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.config.fed import FedJob
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.server.app import start
from gradcomp.server.transport import FD_RESERVE, raise_file_limit

Code = grpc.StatusCode
TOKENS = {"client-0": "token-zero-0000", "client-1": "token-one-11111"}
CHECK = "/grpc.health.v1.Health/Check"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets rlimits")


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def job_data(tmp: Path, limits: dict | None = None, **server: object) -> dict:
    (tmp / "tokens.txt").write_text("".join(f"{n} {t}\n" for n, t in TOKENS.items()))
    return {
        "name": "dos-test",
        "task": {"name": "synthetic", "args": {"num_params": 2000, "num_examples": 64, "input_dim": 16}},
        "rounds": 1000,
        "clients": {"expected": 2, "min": 2},
        "round": {"min_clients": 1, "deadline_seconds": 600},
        "limits": {"max_message_bytes": 1 << 20, "max_update_bytes": 1 << 20, "chunk_bytes": 8192, **(limits or {})},
        "server": {"port": 0, "host": "127.0.0.1", "tokens_file": str(tmp / "tokens.txt"), "linger_seconds": 0,
                   **server},
    }  # fmt: skip


def _rss_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@contextlib.contextmanager
def serve_process(tmp: Path, data: dict, files: int | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """`gradcomp serve` in a child process (with at most `files` open files); yields (process, port)."""
    (tmp / "fed.yaml").write_text(yaml.safe_dump(data))

    def limit_files() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    proc = subprocess.Popen(
        [sys.executable, "-m", "gradcomp.cli", "serve", "--config", str(tmp / "fed.yaml"), "--runs-dir",
         str(tmp / "runs")],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=limit_files if files else None,
    )  # fmt: skip
    try:
        endpoint = tmp / "runs" / data["name"] / "endpoint.json"
        end = time.monotonic() + 120
        while not endpoint.is_file():
            assert proc.poll() is None and time.monotonic() < end, "coordinator did not start"
            time.sleep(0.1)
        yield proc, json.loads(endpoint.read_text())["port"]
    finally:
        proc.kill()
        proc.wait()


# --- the health service ----------------------------------------------------------------------------
@linux_only
def test_anonymous_health_checks_do_not_grow_the_coordinator(tmp_path: Path) -> None:
    """12 concurrent anonymous 16 MiB Health/Check calls: answered SERVING, and the coordinator's peak RSS
    stays within 48 MiB of its RSS before them (read in full, the bodies alone take 192 MiB)."""
    limit, flood = 16 << 20, 12
    data = job_data(tmp_path, limits={"max_message_bytes": limit, "max_update_bytes": limit})
    with serve_process(tmp_path, data) as (proc, port):
        time.sleep(0.5)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = _rss_mib(proc.pid, "VmRSS")
        body = b"\x0a" + b"\xff\xff\xff\x07" + b"x" * (limit - 1024)  # field 1 (service), one huge string
        answers: list[object] = []

        def probe() -> None:
            opts = [("grpc.max_send_message_length", 2 * limit)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                reply = ch.unary_unary(CHECK, response_deserializer=health_pb2.HealthCheckResponse.FromString)
                try:
                    answers.append(reply(body, timeout=60).status)
                except grpc.RpcError as err:
                    answers.append(err.code())

        threads = [threading.Thread(target=probe) for _ in range(flood)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        peak = _rss_mib(proc.pid, "VmHWM")
    assert answers == [health_pb2.HealthCheckResponse.SERVING] * flood
    assert peak - before < 48, f"coordinator RSS rose from {before:.0f} to {peak:.0f} MiB under the probes"


def test_health_watch_streams_are_capped_and_freed(tmp_path: Path) -> None:
    run = start(FedJob.model_validate(job_data(tmp_path, limits={"max_health_watchers": 4})), tmp_path / "run")
    channel = grpc.insecure_channel(f"127.0.0.1:{run.port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(4)]
        assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 4
        extra = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            next(extra)
        assert err.value.code() == Code.RESOURCE_EXHAUSTED and "max_health_watchers" in err.value.details()
        watches.pop().cancel()
        end = time.monotonic() + 10
        while run.health.watchers > 3:
            assert time.monotonic() < end, "a cancelled Watch stream still counts"
            time.sleep(0.02)
        again = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(again).status == health_pb2.HealthCheckResponse.SERVING
        run.health.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert [next(w).status for w in (*watches, again)] == [health_pb2.HealthCheckResponse.NOT_SERVING] * 4
    finally:
        channel.close()
        run.stop(0)


@linux_only
@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_while_watch_streams_are_cancelled_still_shuts_down(tmp_path: Path, attempt: int) -> None:
    """Watch streams cancelled while the coordinator stops (health status set, server stopped): the
    process ends within 30 s and writes its final status. grpcio's HealthServicer deadlocked here."""
    data = job_data(tmp_path, limits={"max_health_watchers": 64})
    with serve_process(tmp_path, data) as (proc, port):
        local = [("grpc.use_local_subchannel_pool", 1)]  # 8 connections, not one shared
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=local) for _ in range(8)]
        watches = [health_pb2_grpc.HealthStub(channels[i % 8]).Watch(health_pb2.HealthCheckRequest(), timeout=60)
                   for i in range(64)]  # fmt: skip
        for w in watches:
            next(w)

        def cancel_all() -> None:
            for w in watches:
                w.cancel()
                time.sleep(0.001)

        canceller = threading.Thread(target=cancel_all)
        canceller.start()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        canceller.join(10)
        for ch in channels:
            ch.close()
        assert rc is not None, "gradcomp serve did not exit after SIGTERM with Watch streams being cancelled"
    results = json.loads((tmp_path / "runs" / "dos-test" / "results.json").read_text())
    assert "finished_at" in results and "status" in results["final"], results  # the final status was written


# --- connections ------------------------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def test_raise_file_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    code = (
        "import resource; from gradcomp.server.transport import raise_file_limit; "
        "print(raise_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )

    def lower() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))

    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024:
        pytest.skip("hard open-file limit below 1024")
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=lower, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1024", "1024"]
    assert raise_file_limit() >= 1024


@linux_only
def test_idle_connections_cannot_take_the_file_handles_an_honest_join_needs(tmp_path: Path) -> None:
    """300 connections that never call (raw TCP, and HTTP/2 with only its preface) against a coordinator
    allowed 200 open files: they are capped below the limit and dropped after the handshake / idle
    timeouts (1 s here), so the coordinator keeps file handles and an honest Join succeeds within 20 s."""
    files = 200
    data = job_data(tmp_path, limits={"handshake_seconds": 1, "connection_idle_seconds": 1})
    with serve_process(tmp_path, data, files=files) as (proc, port):
        idle = []
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                with contextlib.suppress(OSError):
                    s.sendall(PREFACE)
            idle.append(s)
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert open_fds <= files - FD_RESERVE // 2, f"coordinator holds {open_fds} files of its {files}"
        start_join = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub, joined = fed_pb2_grpc.CoordinatorStub(ch), None
            while joined is None and time.monotonic() - start_join < 20:
                try:
                    joined = stub.Join(fed_pb2.JoinRequest(client_id="c0", protocol_version=PROTOCOL_VERSION),
                                       metadata=md(TOKENS["client-0"]), timeout=2)  # fmt: skip
                except grpc.RpcError as err:
                    assert err.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED), err
                    time.sleep(0.2)
        for s in idle:
            s.close()
        assert joined is not None and joined.client_name == "client-0", "honest Join locked out by idle connections"


# --- one token ------------------------------------------------------------------------------------
def test_one_token_with_stalled_bodies_cannot_freeze_the_job(tmp_path: Path) -> None:
    """64 calls under client-0's token whose bodies never arrive, against max_concurrent_rpcs 16: at most
    4 are served (the rest refused at once, busy), those end DEADLINE_EXCEEDED after 1 s, and client-1
    is served all along."""
    data = job_data(tmp_path, limits={"max_calls_per_client": 4, "request_read_seconds": 1.0})
    data["server"]["max_concurrent_rpcs"] = 16
    run = start(FedJob.model_validate(data), tmp_path / "run")
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(30)
        yield b""

    channel = grpc.insecure_channel(f"127.0.0.1:{run.port}")
    try:
        stalled = channel.stream_unary("/gradcomp.v1.Coordinator/Heartbeat")
        calls = [stalled.future(never(), metadata=md(TOKENS["client-0"]), timeout=30) for _ in range(64)]
        time.sleep(0.3)
        stub = fed_pb2_grpc.CoordinatorStub(channel)
        for _ in range(5):  # while the stalled calls are open
            beat = stub.Heartbeat(fed_pb2.HeartbeatRequest(client_id="c1"), metadata=md(TOKENS["client-1"]), timeout=2)
            assert beat.round == 0
        codes = []
        for c in calls:
            try:
                c.result(timeout=20)
                codes.append(Code.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                if err.code() == Code.RESOURCE_EXHAUSTED:
                    assert "Concurrent RPC limit exceeded" in err.details()  # clients retry this
    finally:
        release.set()
        channel.close()
        run.stop(0)
    assert codes.count(Code.DEADLINE_EXCEEDED) <= 8, codes  # 4 at a time, each freed after 1 s
    assert codes.count(Code.DEADLINE_EXCEEDED) >= 4, codes
    assert set(codes) <= {Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED}, codes
