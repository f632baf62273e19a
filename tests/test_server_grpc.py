"""A real gRPC coordinator on 127.0.0.1 (in this process) against honest clients and a hostile one.

Each bad input gets its precise status code, is counted in metrics by reason, and the round
still completes with the honest clients. Also: health service, chunked model download, TLS.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from conftest import fed_job
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp import metrics
from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.client.grpc_client import FLClient
from gradcomp.config.fed import FedJob
from gradcomp.protocol.channel import message_options
from gradcomp.protocol.codec import named_to_pb
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.server.app import Running, round_loop, start

pytestmark = pytest.mark.server

TOKENS = {"alice": "alice-token-123", "bob": "bob-token-4567", "mallory": "mallory-token-89"}
Code = grpc.StatusCode


def make_job(tmp: Path, **kw: object) -> FedJob:
    (tmp / "tokens.txt").write_text("".join(f"{n} {t}\n" for n, t in TOKENS.items()))
    data: dict = {
        "name": "grpc-test",
        "rounds": 2,
        "clients": {"expected": 3, "min": 3},
        "round": {"min_clients": 2, "deadline_seconds": 60},
        "local": {"epochs": 1, "batch_size": 64, "lr": 0.1},
        "compression": "topk(ratio=0.2) | ef",
        "limits": {"max_message_bytes": 1 << 20, "max_update_bytes": 100_000, "chunk_bytes": 8192},
        "server": {"port": 0, "tokens_file": str(tmp / "tokens.txt"), "heartbeat_seconds": 1, "linger_seconds": 0},
    }
    return fed_job(data, **kw)


def client_args(port: int, token: str, **kw: object) -> argparse.Namespace:
    base = dict(server=f"127.0.0.1:{port}", token=token, client_id=None, shard=None, tls_ca=None, tls_cert=None,
                tls_key=None, seed=0, retry_seconds=20.0, rpc_timeout=10.0, quiet=True)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


class Harness:
    def __init__(self, run: Running):
        self.run, self.stop = run, threading.Event()
        self.loop = threading.Thread(target=round_loop, args=(run, self.stop, False), daemon=True)
        self.loop.start()

    def honest(self, name: str, **kw: object) -> tuple[threading.Thread, dict]:
        out: dict = {}

        def go() -> None:
            out["rc"] = FLClient(client_args(self.run.port, TOKENS[name], **kw)).run()

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t, out

    def close(self) -> None:
        self.stop.set()
        self.loop.join(5)
        self.run.stop(0)


def wait_for(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def valid_request(run: Running, round_id: int, value: float = 0.0) -> fed_pb2.SubmitUpdateRequest:
    req = fed_pb2.SubmitUpdateRequest(round=round_id, num_examples=10)
    req.update.extend(named_to_pb({k: torch.full_like(v, value) for k, v in run.coord.params.items()}))
    return req


def expect(code: Code, fn, *a, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        fn(*a, **kw)
    assert e.value.code() == code, e.value.details()
    return e.value.details()


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    run = start(make_job(tmp_path), tmp_path / "run")
    h = Harness(run)
    yield h
    h.close()


def test_bad_inputs_each_get_their_status_and_round_completes(served: Harness) -> None:
    run = served.run
    channel = grpc.insecure_channel(
        f"127.0.0.1:{run.port}", options=message_options(run.coord.job.limits.max_message_bytes)
    )
    stub = fed_pb2_grpc.CoordinatorStub(channel)
    m = md(TOKENS["mallory"])
    before = {r: metrics.value("gradcomp_fed_updates_rejected_total", {"reason": r}) for r in metrics.REJECT_REASONS}

    expect(Code.UNAUTHENTICATED, stub.Join, fed_pb2.JoinRequest(), metadata=md("nope-nope-nope"), timeout=5)
    stub.Join(fed_pb2.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=m, timeout=5)
    threads = [served.honest("alice"), served.honest("bob")]
    wait_for(lambda: run.coord.current is not None)
    assert stub.PullTask(fed_pb2.PullTaskRequest(), metadata=m, timeout=5).action == fed_pb2.PullTaskResponse.TRAIN

    good = valid_request(run, 1)
    expect(Code.UNAUTHENTICATED, stub.SubmitUpdate, good, metadata=md("wrong-token-xyz"), timeout=5)
    expect(Code.FAILED_PRECONDITION, stub.SubmitUpdate, valid_request(run, 7), metadata=m, timeout=5)
    stale_model = valid_request(run, 1)
    stale_model.model_version = 999  # the audit's v999 for round 1 used to be counted
    assert "trained on model v999" in expect(Code.FAILED_PRECONDITION, stub.SubmitUpdate, stale_model, metadata=m,
                                             timeout=5)  # fmt: skip
    shape = valid_request(run, 1)
    shape.update[0].tensor.shape[:] = [1, *shape.update[0].tensor.shape]
    expect(Code.INVALID_ARGUMENT, stub.SubmitUpdate, shape, metadata=m, timeout=5)
    expect(Code.INVALID_ARGUMENT, stub.SubmitUpdate, valid_request(run, 1, float("nan")), metadata=m, timeout=5)
    big = valid_request(run, 1)
    big.update[0].tensor.values += b"\0" * 200_000
    expect(Code.RESOURCE_EXHAUSTED, stub.SubmitUpdate, big, metadata=m, timeout=5)
    huge = valid_request(run, 1)
    huge.update[0].tensor.values += b"\0" * (2 << 20)  # beyond the gRPC message limit itself
    expect(Code.RESOURCE_EXHAUSTED, stub.SubmitUpdate, huge, metadata=m, timeout=5)

    # duplicate: after alice's update is in, resend one with her (stolen) token
    wait_for(lambda: run.coord.current is not None and "alice" in run.coord.current.received)
    details = expect(Code.ALREADY_EXISTS, stub.SubmitUpdate, valid_request(run, 1), metadata=md(TOKENS["alice"]),
                     timeout=5)  # fmt: skip
    assert "already submitted" in details

    stub.Leave(fed_pb2.LeaveRequest(), metadata=m, timeout=5)  # mallory gives up: the round closes with 2
    for t, out in threads:
        t.join(60)
        assert out.get("rc") == 0
    coord = run.coord
    assert coord.status == "finished" and [e["clients"] for e in coord.log] == [2, 2]
    assert coord.log[0]["rejected"] == {
        "unauthenticated": 1, "stale_round": 2, "bad_shape": 1, "non_finite": 1, "too_large": 1, "duplicate": 1
    }  # fmt: skip
    after = {r: metrics.value("gradcomp_fed_updates_rejected_total", {"reason": r}) for r in metrics.REJECT_REASONS}
    for reason in ("unauthenticated", "bad_shape", "non_finite", "too_large", "duplicate"):
        assert after[reason] - before[reason] == 1, reason
    assert after["stale_round"] - before["stale_round"] == 2
    channel.close()


_TENSOR = st.builds(
    fed_pb2.Tensor,
    kind=st.integers(0, 3),
    dtype=st.integers(0, 7),
    value_dtype=st.integers(0, 7),
    index_dtype=st.integers(0, 7),
    shape=st.lists(st.integers(0, 2**40), max_size=10),
    values=st.binary(max_size=512),
    indices=st.binary(max_size=512),
)


def test_garbage_is_refused_and_round_still_completes(served: Harness) -> None:
    run = served.run
    channel = grpc.insecure_channel(
        f"127.0.0.1:{run.port}", options=message_options(run.coord.job.limits.max_message_bytes)
    )
    stub = fed_pb2_grpc.CoordinatorStub(channel)
    raw = channel.unary_unary("/gradcomp.v1.Coordinator/SubmitUpdate")  # bytes in, bytes out
    m = md(TOKENS["mallory"])
    stub.Join(fed_pb2.JoinRequest(), metadata=m, timeout=5)
    threads = [served.honest("alice"), served.honest("bob")]
    wait_for(lambda: run.coord.current is not None)
    names = list(run.coord.params)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(tensor=_TENSOR, which=st.sampled_from(names), blob=st.binary(max_size=256))
    def attack(tensor: fed_pb2.Tensor, which: str, blob: bytes) -> None:
        req = valid_request(run, 1)
        for nt in req.update:
            if nt.name == which:
                nt.tensor.CopyFrom(tensor)
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitUpdate(req, metadata=m, timeout=5)
        assert e.value.code() in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            raw(blob, metadata=m, timeout=5)  # raw bytes: not even a valid message, or a wrong one
        assert e.value.code() != Code.OK

    attack()
    assert run.coord.current is not None and "mallory" not in run.coord.current.received
    stub.Leave(fed_pb2.LeaveRequest(), metadata=m, timeout=5)
    for t, out in threads:
        t.join(60)
        assert out.get("rc") == 0
    assert run.coord.status == "finished" and [e["clients"] for e in run.coord.log] == [2, 2]
    channel.close()


def test_health_service_and_chunked_model(served: Harness) -> None:
    run = served.run
    channel = grpc.insecure_channel(f"127.0.0.1:{run.port}")
    hs = health_pb2_grpc.HealthStub(channel)
    for svc in ("", "gradcomp.v1.Coordinator"):
        assert hs.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == 1  # SERVING
    stub = fed_pb2_grpc.CoordinatorStub(channel)
    threads = [served.honest(n) for n in ("alice", "bob", "mallory")]
    wait_for(lambda: run.coord.current is not None)
    # The current model, not PullTask: a fast client may already have submitted (PullTask then says WAIT).
    version = run.coord.snapshot()[0]
    first = stub.GetModel(fed_pb2.GetModelRequest(version=version, chunk=0), metadata=md(TOKENS["alice"]), timeout=5)
    assert first.num_chunks > 1  # 9.6k float params at 8 KiB chunks
    expect(Code.OUT_OF_RANGE, stub.GetModel, fed_pb2.GetModelRequest(version=version, chunk=10_000),
           metadata=md(TOKENS["alice"]), timeout=5)  # fmt: skip
    expect(Code.NOT_FOUND, stub.GetModel, fed_pb2.GetModelRequest(version=99), metadata=md(TOKENS["bob"]), timeout=5)
    for t, out in threads:
        t.join(60)
        assert out.get("rc") == 0
    assert run.coord.status == "finished"
    assert served.run.coord.log[-1]["clients"] == 3
    channel.close()


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from gradcomp.server.tls import generate

    certs = generate(tmp_path / "certs", ["localhost", "127.0.0.1"], clients=1)
    job = make_job(
        tmp_path,
        rounds=1,
        clients={"expected": 1, "min": 1},
        round={"min_clients": 1, "deadline_seconds": 30},
        server={"port": 0, "host": "127.0.0.1", "tokens_file": str(tmp_path / "tokens.txt"), "linger_seconds": 0,
                "tls_cert": str(certs["server_cert"]), "tls_key": str(certs["server_key"]),
                "tls_client_ca": str(certs["ca"])},
    )  # fmt: skip
    # With client certificates required, each token is bound to a certificate identity.
    (tmp_path / "tokens.txt").write_text("".join(f"{n} {t} client-0\n" if n == "alice" else f"{n} {t} {n}\n"
                                                 for n, t in TOKENS.items()))  # fmt: skip
    run = start(job, tmp_path / "run")
    h = Harness(run)
    try:
        t, out = h.honest(
            "alice", tls_ca=str(certs["ca"]), tls_cert=str(certs["client-0_cert"]), tls_key=str(certs["client-0_key"])
        )
        t.join(60)
        assert out.get("rc") == 0 and run.coord.status == "finished"
        # without a client certificate the TLS handshake is refused
        from gradcomp.protocol.channel import channel_credentials

        ch = grpc.secure_channel(f"127.0.0.1:{run.port}", channel_credentials(str(certs["ca"])))
        expect(Code.UNAVAILABLE, fed_pb2_grpc.CoordinatorStub(ch).Join, fed_pb2.JoinRequest(),
               metadata=md(TOKENS["alice"]), timeout=5)  # fmt: skip
        ch.close()
    finally:
        h.close()
