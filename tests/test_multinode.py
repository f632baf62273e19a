"""Multi-node Ray on one machine: a head and a second node as separate `ray start` processes.

`gradcomp train` (2 Ray Train workers of {"CPU": 1}) and `gradcomp fedsim` (one client actor per
CPU) join the cluster through `--address`, exactly as on a real cluster. Each node offers one CPU,
so the work has to spread over both; the test then asks the cluster's GCS which node every
worker / client actor of each run was placed on, and checks both node IDs appear.

Cleanup never uses `ray stop` (that would stop every Ray on the machine, other users' included):
each `ray start --block` runs in its own session and only those process groups are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from gradcomp.raycluster import LOCAL_NODE_IP

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
GRADCOMP = [sys.executable, "-m", "gradcomp.cli"]
# Both nodes advertise a loopback address, so the cluster never talks over a real interface.
LOOPBACK_NODE_IP = LOCAL_NODE_IP

# Asks the GCS (no dashboard needed) for the live nodes and every actor, dead or alive.
QUERY = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [
    {"id": a["ActorID"], "cls": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
    for a in state.actors().values()
]
print("QUERY-RESULT " + json.dumps({"nodes": nodes, "actors": actors}))
"""


def _node_ports() -> list[str]:
    """Ports two Ray nodes on one machine would otherwise both take from fixed defaults."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_groups(procs: list[subprocess.Popen[Any]]) -> None:
    """Stop `ray start --block` processes and everything they started (their own process groups
    only): SIGTERM to each group, SIGKILL to whatever is left after 5 s."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_group_alive(p.pid) for p in procs):
        time.sleep(0.5)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _query(address: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", QUERY, address], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("QUERY-RESULT ")), None)
    assert line is not None, f"cluster query failed: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    return json.loads(line[len("QUERY-RESULT ") :])


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    if RAY is None:
        pytest.skip("the ray CLI is not installed")
    temp = tempfile.mkdtemp(prefix="gcmn", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    port = free_port()
    address = f"{LOOPBACK_NODE_IP}:{port}"
    # Ray 2.5x turns on token authentication for a new cluster when ~/.ray/auth_token exists; give
    # this cluster its own token explicitly (nodes, drivers and workers inherit the environment).
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "GLOO_SOCKET_IFNAME": "lo",  # gloo pairs between the train workers stay on loopback too
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    common = [
        "--num-cpus=1",
        f"--node-ip-address={LOOPBACK_NODE_IP}",
        f"--temp-dir={temp}",
        f"--object-store-memory={100 * 1024**2}",
        "--disable-usage-stats",
        "--block",
    ]
    procs: list[subprocess.Popen[Any]] = []

    def start(name: str, args: list[str]) -> None:
        log = open(os.path.join(temp, f"{name}.log"), "w")  # noqa: SIM115 (closed with the process)
        procs.append(
            subprocess.Popen(
                [RAY, "start", *args, *common, *_node_ports()],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )

    def logs() -> str:
        return "\n".join(
            f"--- {n}\n" + Path(temp, f"{n}.log").read_text()[-3000:]
            for n in ("head", "node2")
            if Path(temp, f"{n}.log").exists()
        )

    try:
        start(
            "head",
            ["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"],
        )
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, env=env).returncode != 0:
            assert procs[0].poll() is None, f"ray head exited:\n{logs()}"
            assert time.monotonic() < deadline, f"ray head not up in 120 s:\n{logs()}"
            time.sleep(1)
        start("node2", [f"--address={address}"])
        while True:
            nodes = _query(address, env)["nodes"]
            if len(nodes) == 2:
                break
            assert procs[1].poll() is None, f"second ray node exited:\n{logs()}"
            assert time.monotonic() < deadline, f"second node did not join in time:\n{logs()}"
            time.sleep(1)
        print(f"\nray cluster {address}: nodes {sorted(nodes)}")
        yield {"address": address, "env": env, "nodes": set(nodes), "logs": logs}
    finally:
        _kill_groups(procs)
        shutil.rmtree(temp, ignore_errors=True)


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(argv[2:5])} timed out after {timeout} s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def _actor_nodes(cluster: dict[str, Any], cls_part: str) -> dict[str, str]:
    """actor id -> node id for every actor (alive or finished) whose class name contains `cls_part`.
    The cluster is fresh for this module, and each test's actor class is its own."""
    return {a["id"]: a["node"] for a in _query(cluster["address"], cluster["env"])["actors"] if cls_part in a["cls"]}


def test_train_runs_one_worker_on_each_node(cluster: dict[str, Any], tmp_path: Path) -> None:
    argv = [
        *GRADCOMP,
        "train",
        "examples/digits-rtopk.yaml",
        "--address",
        cluster["address"],
        "--workers",
        "2",
        "--runs-dir",
        str(tmp_path),
        "--set",
        "name=multinode-train",
        "--set",
        "epochs=2",
        "--set",
        "checkpoint.every_epochs=2",
    ]
    out = _run(argv, cluster["env"], timeout=240)
    print(out.stdout[-1500:])
    assert out.returncode == 0, f"gradcomp train failed:\n{out.stdout[-4000:]}\n{cluster['logs']()}"
    results = json.loads((tmp_path / "multinode-train" / "results.json").read_text())
    assert results["final"]["status"] == "finished"
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert results["bytes_sent"] > 0 and results["dense_bytes"] > 10 * results["bytes_sent"]
    assert results["final"]["test_accuracy"] > 0.3, "well above chance (0.1) after 2 epochs"

    workers = _actor_nodes(cluster, "RayTrainWorker")
    print(f"train worker actors -> nodes: {workers}")
    assert len(workers) == 2, f"expected 2 Ray Train workers, found {workers}"
    assert set(workers.values()) == cluster["nodes"], "the 2 workers must run on the 2 different nodes"


def test_fedsim_spreads_clients_over_both_nodes(cluster: dict[str, Any], tmp_path: Path) -> None:
    argv = [
        *GRADCOMP,
        "fedsim",
        "examples/fedsim-digits.yaml",
        "--address",
        cluster["address"],
        "--runs-dir",
        str(tmp_path),
        "--set",
        "name=multinode-fedsim",
        "--set",
        "rounds=2",
        "--set",
        "clients.expected=4",
        "--set",
        "round.fraction=1.0",
        "--set",
        "round.min_clients=2",
        "--set",
        "local.epochs=1",
        "--set",
        "simulation.dropout=0.0",
        "--set",
        "simulation.stragglers.fraction=0.0",
    ]
    out = _run(argv, cluster["env"], timeout=240)
    print(out.stdout[-600:])
    assert out.returncode == 0, f"gradcomp fedsim failed:\n{out.stdout[-4000:]}\n{cluster['logs']()}"
    results = json.loads((tmp_path / "multinode-fedsim" / "results.json").read_text())
    final = results["final"]
    assert final["status"] == "finished" and final["rounds"] == 2
    assert final["actors"] == 2, "one client actor per CPU of the two-node cluster"
    assert final["updates_accepted"] == 2 * 4, "all 4 clients in each of 2 rounds (no dropouts)"
    assert results["bytes_sent"] > 0

    runners = _actor_nodes(cluster, "_Runner")
    print(f"fedsim client actors -> nodes: {runners}")
    assert len(runners) == 2, f"expected 2 client actors, found {runners}"
    assert set(runners.values()) == cluster["nodes"], "the client actors must run on both nodes"
