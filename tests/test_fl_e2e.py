"""`gradcomp serve` + 3 `gradcomp client` processes on 127.0.0.1: a full run with rtopk+ef and
local DP, /metrics scraped over HTTP, and a kill -9 of the coordinator followed by --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, write_yaml

pytestmark = pytest.mark.server

TOKENS = {"client-0": "tok-aaaaaaaa", "client-1": "tok-bbbbbbbb", "client-2": "tok-cccccccc"}
CLI = [sys.executable, "-m", "gradcomp.cli"]


def write_job(tmp: Path, **kw: object) -> Path:
    job = {
        "name": "e2e",
        "task": {"name": "digits-mlp"},
        "rounds": 5,
        "clients": {"expected": 3, "min": 3},
        "round": {"min_clients": 2, "deadline_seconds": 60},
        "local": {"epochs": 2, "batch_size": 32, "lr": 0.2},
        "compression": "rtopk(ratio=0.1, r=0.3) | ef",
        "privacy": {"mode": "local", "clip": 2.0, "noise_multiplier": 0.05, "delta": 1e-5},
        "server": {"heartbeat_seconds": 2, "linger_seconds": 10},
    }
    job.update(kw)
    return write_yaml(tmp / "fed.yaml", job)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["GRADCOMP_TOKENS"] = ",".join(f"{n}={t}" for n, t in TOKENS.items())
    e["OMP_NUM_THREADS"] = "1"
    return e


def serve(job: Path, runs: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "serve", "--config", str(job), "--runs-dir", str(runs), *extra],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def clients(port: int, retry_seconds: int = 60) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [
                *CLI,
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--token",
                tok,
                "--retry-seconds",
                str(retry_seconds),
                "--quiet",
            ],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for tok in TOKENS.values()
    ]


def wait_file(path: Path, proc: subprocess.Popen, timeout: float = 90) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    return codes


def test_three_clients_local_dp_rtopk_metrics(tmp_path: Path) -> None:
    job = write_job(tmp_path, server={"heartbeat_seconds": 2, "linger_seconds": 10, "metrics_linger_seconds": 60})
    runs, port = tmp_path / "runs", free_port()
    server = serve(job, runs, "--port", str(port), "--metrics-port", "0")
    procs: list[subprocess.Popen] = []
    try:
        ep = wait_file(runs / "e2e" / "endpoint.json", server)
        assert ep["port"] == port
        # Clients start once the port is bound: one retrying against a port nobody listens on yet can
        # be given that very port as its source and connect to itself, and the server's bind fails.
        procs = clients(port)
        assert finish(procs) == [0, 0, 0], [p.stdout.read() for p in procs if p.stdout]
        results = wait_file(runs / "e2e" / "results.json", server)
        end = time.monotonic() + 60
        while results.get("finished_at") is None and time.monotonic() < end:
            time.sleep(0.1)
            results = json.loads((runs / "e2e" / "results.json").read_text())
        m = scrape(ep["metrics_port"])  # the job is over; /metrics still answers (metrics_linger_seconds)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    hist = results["history"]
    assert [e["round"] for e in hist] == [1, 2, 3, 4, 5]
    accs = [e["test_accuracy"] for e in hist]
    assert accs[-1] > accs[0] + 0.15 and accs[-1] > 0.4, accs  # the global model learns despite DP + 10% rtopk
    assert results["epsilon"] is not None and results["epsilon"] > 0 and results["delta"] == 1e-5
    assert all(e["epsilon"] > 0 for e in hist) and hist[-1]["epsilon"] == pytest.approx(results["epsilon"])
    assert results["bytes_sent"] < results["dense_bytes"] / 3
    # /metrics over HTTP agrees with the run
    assert m["gradcomp_fed_round"] == 5
    assert m["gradcomp_fed_rounds_completed_total"] == 5
    assert m["gradcomp_fed_updates_accepted_total"] == sum(e["clients"] for e in hist) == 15
    assert m["gradcomp_fed_uplink_bytes_total"] == results["bytes_sent"]
    assert m["gradcomp_fed_uplink_dense_bytes_total"] == results["dense_bytes"]
    assert m["gradcomp_fed_downlink_bytes_total"] > 0
    assert m["gradcomp_fed_privacy_epsilon"] == pytest.approx(results["epsilon"])
    assert m["gradcomp_fed_global_test_accuracy"] == pytest.approx(accs[-1])
    assert m["gradcomp_fed_aggregate_duration_seconds_count"] == 5
    assert m['gradcomp_fed_rpcs_total{code="OK",method="SubmitUpdate"}'] == 15
    assert sum(v for k, v in m.items() if k.startswith("gradcomp_fed_updates_rejected_total")) == 0
    assert "WITHOUT TLS" in out


def test_kill_9_and_resume_counts_every_round_once(tmp_path: Path) -> None:
    # Enough rounds that the kill lands mid-run however fast rounds go, and clients that outlast a slow restart.
    job = write_job(tmp_path, rounds=12, local={"epochs": 2, "batch_size": 16, "lr": 0.05})
    runs, port = tmp_path / "runs", free_port()
    server = serve(job, runs, "--port", str(port))
    procs = clients(port, retry_seconds=180)
    try:
        wait_file(runs / "e2e" / "endpoint.json", server)
        ckpt_results = runs / "e2e" / "results.json"
        end = time.monotonic() + 90
        while time.monotonic() < end:
            if ckpt_results.is_file() and len(json.loads(ckpt_results.read_text())["history"]) >= 2:
                break
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        killed_at = len(json.loads(ckpt_results.read_text())["history"])
        assert 2 <= killed_at < 12, "the run finished before it could be killed"
        # Without --resume the coordinator refuses to overwrite the run (checked while the resumed one starts).
        refused = subprocess.Popen([*CLI, "serve", "--config", str(job), "--runs-dir", str(runs), "--port", "0"],
                                   env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        server = serve(job, runs, "--port", str(port), "--resume")
        refused_out, _ = refused.communicate(timeout=60)
        assert refused.returncode == 2 and "--resume" in refused_out, refused_out
        codes = finish(procs, timeout=240)
        assert codes == [0, 0, 0], [(c, p.stdout.read()) for c, p in zip(codes, procs, strict=True) if c and p.stdout]
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()
    results = json.loads((runs / "e2e" / "results.json").read_text())
    assert [e["round"] for e in results["history"]] == list(range(1, 13))
    assert results["final"]["rounds"] == 12 and results["final"]["status"] == "finished"
    assert results["bytes_sent"] == sum(e["uplink_bytes"] for e in results["history"])
    assert results["epsilon"] == pytest.approx(results["history"][-1]["epsilon"])
