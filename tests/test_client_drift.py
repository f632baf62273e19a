"""One client runtime, three transports: for the same job, seed, client and round, the in-process
simulation, the `--grpc` simulation and a real `gradcomp client` send byte-identical updates, and
both simulations make the same dropout and straggler decisions. The real client gets the
simulation's secrets as a deployment would hold them: its noise key in its --noise-key-file, the
coordinator's secret passed to the coordinator (`sim/keys.py`)."""

from __future__ import annotations

import argparse
import ast
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.client.grpc_client import FLClient
from gradcomp.config.common import validate
from gradcomp.config.fed import FedJob
from gradcomp.protocol.channel import message_options
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.server.app import round_loop, start
from gradcomp.sim import engine, grpc_mode
from gradcomp.sim.client import ClientJob, ClientResult
from gradcomp.sim.fate import Fate, client_fate
from gradcomp.sim.keys import ClientKeys, coordinator_secret, simulation_secret
from gradcomp.sim.pool import LocalPool
from gradcomp.sim.setup import build_simulation, client_config
from gradcomp.sim.state import client_name

N = 6
JOB: dict[str, Any] = {
    "name": "drift",
    "task": "digits-mlp",
    "rounds": 2,
    "clients": {"expected": N},
    "round": {"fraction": 0.5, "min_clients": 1, "deadline_seconds": 6, "max_retries": 0},  # no update is late
    "local": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.5},
    "compression": "rtopk(ratio=0.1, r=0.3) | ef",  # random selection and error feedback across rounds
    "privacy": {"mode": "local", "clip": 2.0, "noise_multiplier": 0.1},  # and each client's DP noise
    "server": {"heartbeat_seconds": 2, "linger_seconds": 0},
    "seed": 5,
    "simulation": {
        "partition": "iid",
        "actors": 0,
        # one client at a time, as a real client trains: the vectorised cohort path equals it within
        # float rounding (tests/test_cohort.py), not to the byte
        "vectorize": "off",
        "dropout": 0.3,
        "stragglers": {"fraction": 0.5, "delay": "uniform", "mean_seconds": 0.2},
    },
}


class Recorder(LocalPool):
    """The driver-side pool, keeping every request it built by (client id, round)."""

    def __init__(self, job: FedJob):
        assert job.simulation is not None
        super().__init__(client_config(job), simulation_secret(job), job.simulation.vectorize)
        self.requests: dict[tuple[int, int], bytes] = {}

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        out = super().run(jobs, model, version)
        self.requests.update({(r.cid, r.round): r.request for r in out})
        return out


def _record_fates(monkeypatch: pytest.MonkeyPatch, module: Any) -> dict[tuple[int, int], Fate]:
    seen: dict[tuple[int, int], Fate] = {}

    def recording(job_seed: int, sim: Any, client: Any, round: int) -> Fate:
        seen[(client.cid, round)] = fate = client_fate(job_seed, sim, client, round)
        return fate

    monkeypatch.setattr(module, "client_fate", recording)
    return seen


@pytest.fixture(scope="module")
def simulations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the job once in process and once over gRPC (module-scoped: a few seconds each)."""
    mp = pytest.MonkeyPatch()
    try:
        fates = {"in_process": _record_fates(mp, engine), "grpc": _record_fates(mp, grpc_mode)}
        job = validate(FedJob, JOB)
        local = Recorder(job)
        sim, _ = build_simulation(job, pool=local, quiet=True)
        sim.run()
        over_grpc = Recorder(job)
        run, driver = grpc_mode.simulate_over_grpc(job, tmp_path_factory.mktemp("grpc"), pool=over_grpc)
    finally:
        mp.undo()
    assert sim.coord.status == run.coord.status == "finished"
    return {"fates": fates, "in_process": local.requests, "grpc": over_grpc.requests, "driver": driver}


@pytest.mark.server
def test_both_simulations_send_byte_identical_updates(simulations: dict[str, Any]) -> None:
    local, over_grpc = simulations["in_process"], simulations["grpc"]
    assert {r for _, r in local} == {1, 2}
    assert local.keys() == over_grpc.keys()  # the same clients trained in the same rounds
    for key, request in local.items():
        assert over_grpc[key] == request, f"client {key[0]} round {key[1]}"


@pytest.mark.server
def test_both_simulations_make_the_same_dropout_and_straggler_decisions(simulations: dict[str, Any]) -> None:
    fates = simulations["fates"]
    assert fates["in_process"] == fates["grpc"]
    decided = fates["in_process"].values()
    assert any(f.dropped for f in decided) and any(f.delay > 0 for f in decided)  # the job exercises both
    dropped = {key for key, f in fates["in_process"].items() if f.dropped}
    assert dropped.isdisjoint(simulations["in_process"]) and simulations["driver"].stats.dropped == len(dropped)


def _md(cid: int) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer tok-{cid}"),)


def _pull_until_train(client: FLClient, round: int) -> fed_pb2.PullTaskResponse:
    for _ in range(400):
        task = client.stub.PullTask(fed_pb2.PullTaskRequest(client_id=client.client_id), metadata=client.metadata)
        if task.action == fed_pb2.PullTaskResponse.TRAIN and task.round == round:
            return task
        time.sleep(0.05)
    raise AssertionError(f"{client.client_id} was never asked to train round {round}")


@pytest.mark.server
def test_a_real_client_sends_the_simulations_bytes(simulations: dict[str, Any], tmp_path: Path) -> None:
    """A real client for one simulated identity, the others replayed from the simulation's own
    updates: the coordinator sees the same rounds, and the real client's two updates (the second
    one carrying its error-feedback memory) are the simulation's, byte for byte."""
    sent = simulations["in_process"]
    both = sorted(cid for cid, r in sent if r == 1 and (cid, 2) in sent)
    assert both, "the job should have a client that trains in both rounds"
    me = both[0]
    tokens = {f"tok-{i}": client_name(i) for i in range(N)}
    job = validate(FedJob, {**JOB, "clients": {"expected": N, "min": N}, "server": {"port": 0, "linger_seconds": 0}})
    secret = simulation_secret(job)
    run = start(job, tmp_path / "run", host="127.0.0.1", tokens=tokens, secret=coordinator_secret(secret))
    stop = threading.Event()
    loop = threading.Thread(target=round_loop, args=(run, stop, False), daemon=True)
    loop.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{run.port}", options=message_options(job.limits.max_message_bytes))
    stub = fed_pb2_grpc.CoordinatorStub(channel)
    args = argparse.Namespace(
        server=f"127.0.0.1:{run.port}", token=f"tok-{me}", client_id=None, shard=f"{me}/{N}", tls_ca=None,
        tls_cert=None, tls_key=None, seed=0, retry_seconds=10.0, rpc_timeout=10.0, quiet=True,
        noise_key_file=str(tmp_path / "noise.key"),
    )  # fmt: skip
    (tmp_path / "noise.key").write_text(ClientKeys(secret)(client_name(me)).hex())
    (tmp_path / "noise.key").chmod(0o600)
    real = FLClient(args)
    try:
        for i in range(N):
            if i != me:
                stub.Join(
                    fed_pb2.JoinRequest(client_id=client_name(i), protocol_version=PROTOCOL_VERSION), metadata=_md(i)
                )
        real.join()
        for round_ in (1, 2):
            task = _pull_until_train(real, round_)
            request = real.train_round(task)
            assert request.SerializeToString(deterministic=True) == sent[(me, round_)], f"round {round_}"
            assert real.train_round(task) is request  # asked again (a lost submit): resent, not retrained
            real.submit(request)
            for (cid, r), data in sent.items():  # the simulation's other updates of this round
                if r == round_ and cid != me:
                    stub.SubmitUpdate(fed_pb2.SubmitUpdateRequest.FromString(data), metadata=_md(cid))
            # until the round is aggregated (after the last one: until the job is over)
            while (run.coord.version < round_ or round_ == JOB["rounds"]) and not run.coord.done:
                for i in range(N):  # heartbeats, so no replayed client times out while the round waits
                    stub.Heartbeat(
                        fed_pb2.HeartbeatRequest(client_id=client_name(i)),
                        metadata=_md(i),
                    )
                time.sleep(0.1)
        assert run.coord.status == "finished"
    finally:
        real.close()
        channel.close()
        stop.set()
        loop.join(5)
        run.stop(0)


def _imports(package: str) -> set[str]:
    """Every gradcomp module a package's files import (top level or inside functions)."""
    root = Path(__file__).resolve().parents[1] / "src" / "gradcomp" / package
    found: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("gradcomp.")}


def test_client_runtime_and_server_do_not_import_each_other() -> None:
    client = _imports("fedclient")
    assert not {m for m in client if m.startswith(("gradcomp.server", "gradcomp.sim", "gradcomp.worker"))}, client
    assert not {m for m in _imports("server") if m.startswith("gradcomp.fedclient")}
    assert not {m for m in _imports("protocol") if m.startswith(("gradcomp.server", "gradcomp.fedclient"))}
