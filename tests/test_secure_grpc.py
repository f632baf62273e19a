"""Secure aggregation over the real gRPC protocol (`gradcomp serve` / `gradcomp client`) on 127.0.0.1.

In-process FLClient threads against a real coordinator: the released model is the mean of the
survivors' secure inputs, bit for bit from their ring sum, and within one rounding step of the mean of
their plaintext updates (which the coordinator never receives); clients killed after advertising,
after sharing and after their masked input are unmasked around; a round below min_survivors aborts
without an unmasking request and is retried under a fresh session; bad SecAgg requests get precise
status codes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import fed_job

from gradcomp import metrics
from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.client.grpc_client import FLClient
from gradcomp.protocol.channel import message_options
from gradcomp.protocol.messages import update_fields
from gradcomp.protocol.model import initial_params, model_spec
from gradcomp.secagg.ddp import planned_epsilon
from gradcomp.secagg.messages import Advertise
from gradcomp.secagg.quantise import from_ring
from gradcomp.server.app import Running, round_loop, start
from gradcomp.server.core import Coordinator
from gradcomp.server.updates import decode_update
from gradcomp.tasks import load_task

pytestmark = pytest.mark.server
Phase = fed_pb2.SecAggRequest
Code = grpc.StatusCode


def tokens(n: int) -> dict[str, str]:
    return {f"c{i}": f"c{i}-token-{i:04d}-abcdefgh" for i in range(n)}


def make_job(tmp: Path, n: int, secure: dict, **kw: object):  # type: ignore[no-untyped-def]
    (tmp / "tokens.txt").write_text("".join(f"{name} {tok}\n" for name, tok in tokens(n).items()))
    data: dict = {
        "name": "secure-grpc",
        "task": {"name": "digits-mlp", "args": {"hidden": 8}},
        "rounds": 1,
        "clients": {"expected": n, "min": n},
        "round": {"fraction": 1.0, "min_clients": 1, "deadline_seconds": 12},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "compression": "none",
        "secure_aggregation": secure,
        "limits": {"max_message_bytes": 1 << 20, "max_update_bytes": 1 << 19, "chunk_bytes": 1 << 16},
        "server": {"port": 0, "tokens_file": str(tmp / "tokens.txt"), "heartbeat_seconds": 0.5, "linger_seconds": 0},
    }
    return fed_job(data, **kw)


class Killed(Exception):
    """Raised inside a client thread: the client stops dead (no Leave, no further call)."""


def client_args(port: int, token: str, shard: str) -> argparse.Namespace:
    return argparse.Namespace(server=f"127.0.0.1:{port}", token=token, client_id=None, shard=shard, tls_ca=None,
                              tls_cert=None, tls_key=None, seed=0, retry_seconds=20.0, rpc_timeout=10.0,
                              quiet=True)  # fmt: skip


class Fleet:
    """A coordinator with its round loop, and FLClient threads."""

    def __init__(self, run: Running, n: int):
        self.run, self.stop, self.n = run, threading.Event(), n
        self.loop = threading.Thread(target=round_loop, args=(run, self.stop, False), daemon=True)
        self.loop.start()
        self.clients: dict[str, FLClient] = {}
        self.threads: list[threading.Thread] = []
        self.killed: list[str] = []

    def add(self, name: str, token: str, shard: int, kill_after: int | None = None, hook=None) -> None:  # type: ignore[no-untyped-def]
        c = FLClient(client_args(self.run.port, token, f"{shard}/{self.n}"))
        self.clients[name] = c
        c.on_secure_phase = hook  # set before the client runs
        if kill_after is not None:
            c.on_secure_phase = lambda phase: self._kill(name, phase, kill_after)

        def go() -> None:
            with contextlib.suppress(Killed):
                c.run()

        t = threading.Thread(target=go, daemon=True)
        t.start()
        self.threads.append(t)

    def _kill(self, name: str, phase: int, after: int) -> None:
        if phase == after:
            self.killed.append(name)
            raise Killed(name)

    def join(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "clients still running"

    def close(self) -> None:
        self.stop.set()
        self.loop.join(5)
        self.run.stop(0)


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def _check_release(fleet: Fleet, start: dict[str, torch.Tensor], survivors: list[str], plain: bool = True) -> None:
    """The released delta is the ring sum of the survivors' inputs over their count (bit for bit up to float32),
    and within one rounding step of the mean of their plaintext updates."""
    coord, plan = fleet.run.coord, fleet.run.coord.secure_plan
    assert plan is not None
    got = (_flat(coord.params) - _flat(start)).double()
    ring = sum(fleet.clients[n].last_secure.astype(np.uint64) for n in survivors) & np.uint64(plan.params.modulus_mask)
    exact = torch.from_numpy(from_ring(ring, plan.encoding.bits) / plan.encoding.scale) / len(survivors)
    if plan.dim == got.numel():  # dense: the sum in model order (randomk sums the round's shared coordinates)
        assert float((got - exact).abs().max()) <= 1e-6
    else:
        nz = got != 0
        assert int(nz.sum()) <= plan.dim < got.numel() and torch.allclose(got[nz], exact[exact != 0], atol=1e-6)
    if not plain:  # noised inputs: the plaintext mean is not expected
        return
    spec = model_spec(start)
    plain = [_flat(decode_update(update_fields(fleet.clients[n].last_request), spec)) for n in survivors]
    mean = torch.stack(plain).double().mean(0)
    assert float((got - mean).abs().max()) <= 1.0 / plan.encoding.scale + 1e-6
    assert float(mean.abs().max()) > 10 / plan.encoding.scale  # the update is far larger than a rounding step


def run_honest(job, tmp_path: Path, n: int):  # type: ignore[no-untyped-def]
    """Serve `job` and run its n clients to the end, none killed: (the run, the fleet, the model before)."""
    run = start(job, tmp_path / "r")
    fleet, begin = Fleet(run, n), {k: v.clone() for k, v in run.coord.params.items()}
    try:
        for i, (name, tok) in enumerate(tokens(n).items()):
            fleet.add(name, tok, i)
        fleet.join()
    finally:
        fleet.close()
    return run, fleet, begin


@pytest.mark.parametrize("spec", ["none", "randomk(ratio=0.25, seed=3)"])
def test_secure_round_over_grpc_releases_the_survivors_mean(tmp_path: Path, spec: str) -> None:
    n = 5
    job = make_job(tmp_path, n, {"clip": 5.0, "degree": 4, "threshold": 3, "min_survivors": 4}, compression=spec)
    run, fleet, begin = run_honest(job, tmp_path, n)
    coord = run.coord
    assert coord.status == "finished" and coord.version == 1, coord.reason
    assert coord.log[0]["clients"] == n
    assert "examples" not in coord.log[0] and "train_loss" not in coord.log[0]
    _check_release(fleet, begin, sorted(tokens(n)))
    assert metrics.value("gradcomp_fed_secagg_phase_duration_seconds_count", {"phase": "unmask"}) >= 1


def test_clients_killed_in_each_phase_are_unmasked_around(tmp_path: Path) -> None:
    n = 9  # complete graph of degree 8: each secret keeps t = 5 holders after three deaths
    secure = {"clip": 5.0, "degree": 8, "threshold": 5, "min_survivors": 6}
    run = start(make_job(tmp_path, n, secure), tmp_path / "r")
    fleet, begin = Fleet(run, n), {k: v.clone() for k, v in run.coord.params.items()}
    recovered = metrics.value("gradcomp_fed_secagg_dropouts_recovered_total")
    kills = {"c1": Phase.ADVERTISE, "c4": Phase.SHARE_KEYS, "c7": Phase.MASKED_INPUT}
    try:
        for i, (name, tok) in enumerate(tokens(n).items()):
            fleet.add(name, tok, i, kills.get(name))
        fleet.join()
    finally:
        fleet.close()
    coord = run.coord
    assert sorted(fleet.killed) == sorted(kills)
    assert coord.status == "finished" and coord.version == 1, coord.reason
    # c7 sent its masked input before it died: it is in the sum, its self-mask rebuilt from its neighbours
    survivors = sorted(set(tokens(n)) - {"c1", "c4"})
    assert coord.log[0]["clients"] == len(survivors) == 7
    _check_release(fleet, begin, survivors)
    assert metrics.value("gradcomp_fed_secagg_dropouts_recovered_total") == recovered + 1  # c4's masks removed


def test_a_round_below_min_survivors_aborts_unrevealed_and_is_retried_afresh(tmp_path: Path) -> None:
    n = 6  # 5 asked per round, min_survivors 5: the first client to die after sharing sinks the attempt
    job = make_job(tmp_path, n, {"clip": 5.0, "degree": 4, "threshold": 3, "min_survivors": 5},
                   round={"fraction": 0.8, "min_clients": 1, "deadline_seconds": 8, "max_retries": 2})  # fmt: skip
    run = start(job, tmp_path / "r")
    fleet = Fleet(run, n)
    aborted = metrics.value("gradcomp_fed_secagg_rounds_aborted_total")
    sessions: list = []
    died = threading.Lock()

    def kill_first(name: str):  # type: ignore[no-untyped-def]
        def hook(phase: int) -> None:
            s = fleet.run.secure.current if fleet.run.secure else None
            if s is not None and all(s is not seen for seen in sessions):
                sessions.append(s)
            if phase == Phase.SHARE_KEYS and died.acquire(blocking=False):
                fleet.killed.append(name)
                raise Killed(name)

        return hook

    try:
        for i, (name, tok) in enumerate(tokens(n).items()):
            fleet.add(name, tok, i, hook=kill_first(name))
        fleet.join()
    finally:
        fleet.close()
    coord = run.coord
    assert len(fleet.killed) == 1 and coord.status == "finished", coord.reason
    assert metrics.value("gradcomp_fed_secagg_rounds_aborted_total") == aborted + 1
    assert coord.log[0]["clients"] == 5  # everyone but the dead client, in the retried attempt
    assert len(sessions) == 2 and sessions[0].session != sessions[1].session  # the retry: a fresh session
    assert sessions[0].aborted and "min_survivors" in sessions[0].aborted
    assert Phase.UNMASK not in sessions[0].requests  # aborted before any unmasking request went out


def test_bad_secagg_requests_get_precise_status_codes(tmp_path: Path) -> None:
    n = 5
    run = start(make_job(tmp_path, n, {"clip": 5.0, "degree": 4, "threshold": 3, "min_survivors": 4}), tmp_path / "r")
    fleet = Fleet(run, n)
    channel = grpc.insecure_channel(f"127.0.0.1:{run.port}", options=message_options(1 << 21))
    stub = fed_pb2_grpc.CoordinatorStub(channel)
    md = {name: (("authorization", f"Bearer {tok}"),) for name, tok in tokens(n).items()}
    try:
        for name in md:
            stub.Join(fed_pb2.JoinRequest(protocol_version=3), metadata=md[name], timeout=5)
        deadline = time.monotonic() + 20
        while (task := stub.PullTask(fed_pb2.PullTaskRequest(), metadata=md["c0"], timeout=5)).action != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert task.secure_session and task.config.secure.degree == 4 and task.config.secure.threshold == 3

        def call(code: Code, phase: int, message: bytes, session: bytes = task.secure_session) -> str:
            req = fed_pb2.SecAggRequest(round=task.round, session=session, phase=phase, message=message)
            with pytest.raises(grpc.RpcError) as e:
                stub.SecAgg(req, metadata=md["c0"], timeout=5)
            assert e.value.code() == code, e.value.details()
            return e.value.details()

        good = Advertise(task.secure_id, b"\x01" * 32, b"\x02" * 32).to_bytes()
        call(Code.FAILED_PRECONDITION, Phase.ADVERTISE, good, session=b"\x00" * 16)  # not the open attempt
        call(Code.INVALID_ARGUMENT, Phase.ADVERTISE, good[:-1])  # does not decode
        call(Code.INVALID_ARGUMENT, Phase.ADVERTISE, good + b"\x00" * 1000)  # over the phase's size
        other = Advertise(task.secure_id + 1, b"\x01" * 32, b"\x02" * 32).to_bytes()
        assert "names client" in call(Code.INVALID_ARGUMENT, Phase.ADVERTISE, other)
        call(Code.INVALID_ARGUMENT, 9, good)  # no such phase
        call(Code.FAILED_PRECONDITION, Phase.MASKED_INPUT, b"\x00" * 9)  # that phase is not open
        call(Code.INVALID_ARGUMENT, Phase.ADVERTISE, b"")  # nothing to fetch in the advertise phase
        ok = stub.SecAgg(fed_pb2.SecAggRequest(round=task.round, session=task.secure_session, phase=Phase.ADVERTISE,
                                               message=good), metadata=md["c0"], timeout=5)  # fmt: skip
        assert ok.state == fed_pb2.SecAggResponse.READY
        call(Code.ALREADY_EXISTS, Phase.ADVERTISE, good)
        wait = stub.SecAgg(fed_pb2.SecAggRequest(round=task.round, session=task.secure_session,
                                                 phase=Phase.SHARE_KEYS), metadata=md["c0"], timeout=5)  # fmt: skip
        assert wait.state == fed_pb2.SecAggResponse.WAIT and not wait.message
        with pytest.raises(grpc.RpcError) as e:  # no update in the clear under secure aggregation
            plain = fed_pb2.SubmitUpdateRequest(round=task.round, num_examples=1)
            stub.SubmitUpdate(plain, metadata=md["c0"], timeout=5)
        assert e.value.code() == Code.FAILED_PRECONDITION
        # the client that advertised is not told to train again in this attempt
        again = stub.PullTask(fed_pb2.PullTaskRequest(), metadata=md["c0"], timeout=5)
        assert again.action == fed_pb2.PullTaskResponse.WAIT
        assert metrics.value("gradcomp_fed_rpcs_total", {"method": "SecAgg", "code": "INTERNAL"}) == 0
    finally:
        channel.close()
        fleet.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_coordinator_crash_mid_protocol_restarts_the_round_with_fresh_masks(tmp_path: Path) -> None:
    n = 5
    job = make_job(tmp_path, n, {"clip": 5.0, "degree": 4, "threshold": 3, "min_survivors": 4}, rounds=2)
    job.server.port = _free_port()
    run = start(job, tmp_path / "r")
    fleet = Fleet(run, n)
    crash, seen = threading.Event(), []

    def hook(name: str, phase: int) -> None:  # round 2, once c0 has sent its shares: the coordinator dies
        s = fleet.run.secure.current if fleet.run.secure else None
        if s is not None and s.number == 2 and all(s is not x for x in seen):
            seen.append(s)
        if name == "c0" and phase == Phase.SHARE_KEYS and fleet.run.coord.version == 1 and not crash.is_set():
            crash.set()

    try:
        for i, (name, tok) in enumerate(tokens(n).items()):
            fleet.add(name, tok, i, hook=functools.partial(hook, name))
        assert crash.wait(60), "round 2 never reached the share phase"
        fleet.close()  # the coordinator stops dead mid-protocol; its clients keep retrying
        run = fleet.run = start(job, tmp_path / "r", resume=True)
        assert run.coord.version == 1 and run.secure is not None and run.secure.current is None
        begin = {k: v.clone() for k, v in run.coord.params.items()}
        fleet.stop = threading.Event()
        fleet.loop = threading.Thread(target=round_loop, args=(run, fleet.stop, False), daemon=True)
        fleet.loop.start()
        fleet.join()
    finally:
        fleet.close()
    assert run.coord.status == "finished" and run.coord.version == 2, run.coord.reason
    # round 2 ran again under a fresh session, and the first attempt after the restart completed
    assert len(seen) == 2 and seen[0].session != seen[1].session and seen[1].attempt == 0
    assert len(seen[1].survivors) >= 4 and run.coord.log[-1]["clients"] == len(seen[1].survivors)
    _check_release(fleet, begin, seen[1].survivors)  # the inputs, re-sent under fresh masks


def test_a_secure_round_opens_only_with_min_survivors_connected(tmp_path: Path) -> None:
    """A resumed coordinator opens a round with one connected client; a secure round that few could only abort."""
    job = make_job(tmp_path, 5, {"clip": 5.0, "degree": 4, "threshold": 3, "min_survivors": 4},
                   clients={"expected": 5, "min": 1})  # fmt: skip
    coord = Coordinator(job, initial_params(load_task(job.task.name, **job.task.args), job.seed))
    for name in ("c0", "c1", "c2"):
        coord.register(name)
    assert coord.select_clients() is None and coord.open_round() is None
    coord.register("c3")
    assert sorted(coord.select_clients() or []) == ["c0", "c1", "c2", "c3"]


def test_distributed_dp_over_grpc_charges_the_survivors_and_reports_delta(tmp_path: Path) -> None:
    n = 5
    privacy = {"mode": "distributed", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    job = make_job(tmp_path, n, {"degree": 4, "threshold": 3, "min_survivors": 4}, privacy=privacy)
    run, fleet, begin = run_honest(job, tmp_path, n)
    coord, plan = run.coord, run.coord.secure_plan
    assert coord.status == "finished" and plan is not None, coord.reason
    _check_release(fleet, begin, sorted(tokens(n)), plain=False)  # noise and all, bit for bit
    e = plan.encoding
    want = planned_epsilon(1, e.norm_bound, float(e.noise_sigma_sq()), n, plan.dim, 1e-5)
    assert coord.log[0]["epsilon"] == pytest.approx(want, rel=1e-9)
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["epsilon"] == pytest.approx(want, rel=1e-9) and results["delta"] == 1e-5
