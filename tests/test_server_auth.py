"""Attacks on the coordinator's front door by parties with no token, a stolen token or a malformed
request, over real gRPC on 127.0.0.1.

- A flood of unauthenticated maximum-size `SubmitUpdate` calls against a `gradcomp serve`
  process: before, every body was received in full before the token was checked (16 x 60 MB
  raised the coordinator's memory by ~450 MB); now the gate refuses them without reading.
- Requests over the size limit are counted as `too_large`; a body that is not protobuf is
  INVALID_ARGUMENT, not gRPC's INTERNAL.
- A fuzz of the whole SubmitUpdate path: only the documented status codes, never INTERNAL.
- With client certificates required, one client's certificate cannot carry another's token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp import metrics
from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.config.fed import FedJob
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.server.app import start

pytestmark = pytest.mark.server

Code = grpc.StatusCode
SUBMIT = "/gradcomp.v1.Coordinator/SubmitUpdate"
TOKENS = {"client-0": "token-zero-0000", "client-1": "token-one-11111"}
SUBMIT_CODES = {  # service.py's documented statuses of SubmitUpdate
    Code.OK, Code.UNAUTHENTICATED, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT,
}  # fmt: skip


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def write_tokens(tmp: Path, identities: dict[str, str] | None = None) -> Path:
    path = tmp / "tokens.txt"
    ids = identities or {}
    path.write_text("".join(f"{n} {t} {ids.get(n, n)}\n" for n, t in TOKENS.items()))
    return path


def job_data(tmp: Path, **kw: object) -> dict:
    data: dict = {
        "name": "auth-test",
        "task": {"name": "synthetic", "args": {"num_params": 2000, "num_examples": 64, "input_dim": 16}},
        "rounds": 1000,
        "clients": {"expected": 2, "min": 1},
        "round": {"min_clients": 1, "deadline_seconds": 600},
        "limits": {"max_message_bytes": 1 << 20, "max_update_bytes": 1 << 20, "chunk_bytes": 8192},
        "server": {"port": 0, "tokens_file": str(write_tokens(tmp)), "linger_seconds": 0},
    }
    data.update(kw)
    return data


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    run = start(FedJob.model_validate(job_data(tmp_path)), tmp_path / "run")
    channel = grpc.insecure_channel(f"127.0.0.1:{run.port}", options=[("grpc.max_send_message_length", 8 << 20)])
    yield run, channel
    channel.close()
    run.stop(0)


def raw_call(channel: grpc.Channel, data: bytes, token: str | None) -> Code:
    """Send `data` as the SubmitUpdate request body, byte for byte; the status code that comes back."""
    call = channel.unary_unary(SUBMIT)  # no serializer: the bytes go out as they are
    try:
        call(data, metadata=md(token) if token else None, timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


# --- memory amplification without a token --------------------------------------------------------
def _rss_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_unauthenticated_flood_of_max_size_updates_does_not_grow_server_memory(tmp_path: Path) -> None:
    """24 concurrent unauthenticated 16 MiB SubmitUpdate calls from 24 connections.

    Bound: the coordinator's peak RSS during the flood stays within 48 MiB of its RSS before it,
    against the 384 MiB the bodies alone would take if they were read (the old behaviour: ~30 MiB
    per request retained). Each call is answered UNAUTHENTICATED.
    """
    limit, flood = 16 << 20, 24
    data = job_data(tmp_path, limits={"max_message_bytes": limit, "max_update_bytes": limit})
    data["server"] |= {"port": 0, "host": "127.0.0.1"}
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(data))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradcomp.cli", "serve", "--config", str(tmp_path / "fed.yaml"),
         "--runs-dir", str(tmp_path / "runs")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        endpoint = tmp_path / "runs" / "auth-test" / "endpoint.json"
        end = time.monotonic() + 120
        while not endpoint.is_file():
            assert proc.poll() is None and time.monotonic() < end, "coordinator did not start"
            time.sleep(0.1)
        port = json.loads(endpoint.read_text())["port"]
        time.sleep(0.5)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = _rss_mib(proc.pid, "VmRSS")
        body = b"\x0a" * (limit - 1024)  # as large as the coordinator accepts
        codes: list[Code] = []

        def attack() -> None:
            with grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 2 * limit)]
            ) as ch:
                codes.append(raw_call(ch, body, token="not-a-token-at-all"))

        threads = [threading.Thread(target=attack) for _ in range(flood)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        peak = _rss_mib(proc.pid, "VmHWM")
        assert codes == [Code.UNAUTHENTICATED] * flood
        assert peak - before < 48, f"coordinator RSS rose from {before:.0f} to {peak:.0f} MiB under the flood"
    finally:
        proc.kill()
        proc.wait()


# --- size limits and unparsable bodies --------------------------------------------------------------
def test_oversized_requests_are_counted_too_large_and_garbage_is_invalid_argument(served) -> None:  # type: ignore[no-untyped-def]
    run, channel = served
    too_large = metrics.value("gradcomp_fed_updates_rejected_total", {"reason": "too_large"})
    malformed = metrics.value("gradcomp_fed_updates_rejected_total", {"reason": "malformed"})
    internal = metrics.value("gradcomp_fed_rpcs_total", {"method": "SubmitUpdate", "code": "INTERNAL"})
    limit = run.coord.job.limits.max_message_bytes
    # Over limits.max_message_bytes: refused by the gate, counted (gRPC's own limit sits at twice it).
    assert raw_call(channel, b"\x0a" * (limit + 10), TOKENS["client-0"]) == Code.RESOURCE_EXHAUSTED
    # (>=: metrics are process-wide, and a coordinator left by an earlier test may still count)
    assert metrics.value("gradcomp_fed_updates_rejected_total", {"reason": "too_large"}) >= too_large + 1
    # Beyond gRPC's hard limit gRPC itself refuses the call. Whether gradcomp's handler had started
    # (and counts it CANCELLED) is up to gRPC's scheduling, so only the refusal is asserted: the
    # counted-cancelled wait here failed about one run in four under load.
    beyond = raw_call(channel, b"\x0a" * (2 * limit + 10), TOKENS["client-0"])
    assert beyond not in (Code.OK, Code.INTERNAL, Code.UNKNOWN), beyond
    # Not protobuf: gRPC's own deserialisation failure used to answer INTERNAL.
    assert raw_call(channel, b"\xff\xff\xff\xff garbage", TOKENS["client-0"]) == Code.INVALID_ARGUMENT
    assert metrics.value("gradcomp_fed_updates_rejected_total", {"reason": "malformed"}) >= malformed + 1
    # An unauthenticated call of any size is refused before its body is looked at.
    assert raw_call(channel, b"\x0a" * (limit + 10), None) == Code.UNAUTHENTICATED
    assert metrics.value("gradcomp_fed_rpcs_total", {"method": "SubmitUpdate", "code": "INTERNAL"}) == internal


# --- fuzz of SubmitUpdate ------------------------------------------------------------------------
@st.composite
def submit_requests(draw: st.DrawFn, spec: dict[str, tuple[tuple[int, ...], int]]) -> tuple[bytes, bool]:
    """(request bytes, whether to aim at the open round): forged tensors around the model's real ones."""
    names = list(spec)
    req = fed_pb2.SubmitUpdateRequest(num_examples=draw(st.sampled_from([0, 1, 10, 2**63, 2**64 - 1])))
    for _ in range(draw(st.integers(0, len(names) + 1))):
        name = draw(st.sampled_from(names) | st.text(max_size=4))
        shape, numel = spec.get(name, ((3,), 3))
        t = req.update.add(name=name).tensor
        t.kind = draw(st.sampled_from([0, 1, 2]))
        t.dtype, t.value_dtype = draw(st.sampled_from([1, 1, 2, 4, 9])), draw(st.sampled_from([1, 1, 2, 3, 4, 7]))
        t.index_dtype = draw(st.sampled_from([0, 5, 6, 16, 17, 18, 19, 33]))
        t.shape.extend(draw(st.sampled_from([shape, (numel,), (), (2**64 - 1, 2), shape[::-1]])))
        count = draw(st.integers(0, 4) | st.just(numel))
        t.values = draw(st.binary(min_size=count * 4, max_size=count * 4) | st.binary(max_size=24))
        t.indices = draw(st.binary(max_size=24) | st.just(bytes(count)))
    if draw(st.booleans()):
        req.metrics["train_loss"] = draw(st.floats(allow_nan=True))
    data = req.SerializeToString()
    if draw(st.integers(0, 9)) == 0:  # now and then, bytes that are not a valid message at all
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=16))
    return data, draw(st.booleans())


def test_fuzzed_submit_updates_get_only_documented_statuses(served) -> None:  # type: ignore[no-untyped-def]
    run, channel = served
    coord = run.coord
    coord.register("client-0")
    assert coord.select_clients() == ["client-0"]
    spec = {k: (tuple(v.shape), v.numel()) for k, v in coord.params.items()}
    before = metrics.value("gradcomp_fed_rpcs_total", {"method": "SubmitUpdate", "code": "INTERNAL"})
    seen: set[Code] = set()

    @given(case=submit_requests(spec), token=st.sampled_from([TOKENS["client-0"], TOKENS["client-1"], None]))
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def fuzz(case: tuple[bytes, bool], token: str | None) -> None:
        data, current_round = case
        if current_round:  # field 2 (round) repeated at the end wins in protobuf: aim at the open round
            data += fed_pb2.SubmitUpdateRequest(round=coord.version + 1).SerializeToString()
        code = raw_call(channel, data, token)
        seen.add(code)
        assert code in SUBMIT_CODES, f"{code} for {data[:80]!r}"
        if code == Code.OK:  # keep a round open for the next example
            assert coord.finish_round(force=True) is not None
            assert coord.select_clients() == ["client-0"]

    fuzz()
    assert metrics.value("gradcomp_fed_rpcs_total", {"method": "SubmitUpdate", "code": "INTERNAL"}) == before
    assert {Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED} <= seen


def test_a_valid_update_still_goes_through_the_gate(served) -> None:  # type: ignore[no-untyped-def]
    run, channel = served
    coord = run.coord
    coord.register("client-0")
    coord.select_clients()
    req = fed_pb2.SubmitUpdateRequest(round=1, num_examples=5)
    from gradcomp.protocol.codec import named_to_pb

    req.update.extend(named_to_pb({k: torch.zeros_like(v) for k, v in coord.params.items()}))
    resp = fed_pb2_grpc.CoordinatorStub(channel).SubmitUpdate(req, metadata=md(TOKENS["client-0"]), timeout=10)
    assert resp.accepted and resp.received == 1


# --- mutual TLS: the certificate must be the token's --------------------------------------------
def test_a_client_certificate_cannot_carry_another_clients_token(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from gradcomp.protocol.channel import channel_credentials
    from gradcomp.server.auth import parse_tokens_text
    from gradcomp.server.tls import generate

    certs = generate(tmp_path / "certs", ["localhost", "127.0.0.1"], clients=2)
    tokens = {ident.name: tok for tok, ident in parse_tokens_text(certs["tokens"].read_text(), "tokens").items()}
    data = job_data(tmp_path)
    data["server"] |= {"host": "127.0.0.1", "tokens_file": str(certs["tokens"]), "tls_cert": str(certs["server_cert"]),
                       "tls_key": str(certs["server_key"]), "tls_client_ca": str(certs["ca"])}  # fmt: skip
    run = start(FedJob.model_validate(data), tmp_path / "run")
    try:
        creds = channel_credentials(str(certs["ca"]), str(certs["client-0_cert"]), str(certs["client-0_key"]))
        with grpc.secure_channel(f"127.0.0.1:{run.port}", creds) as ch:
            stub = fed_pb2_grpc.CoordinatorStub(ch)
            with pytest.raises(grpc.RpcError) as err:  # the attack: client-0's certificate, client-1's token
                stub.Join(
                    fed_pb2.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=md(tokens["client-1"]), timeout=10
                )
            assert err.value.code() == Code.UNAUTHENTICATED
            assert "does not belong to the token of client 'client-1'" in (err.value.details() or "")
            assert run.coord.clients == {}
            joined = stub.Join(
                fed_pb2.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=md(tokens["client-0"]), timeout=10
            )
            assert joined.client_name == "client-0"
    finally:
        run.stop(0)
