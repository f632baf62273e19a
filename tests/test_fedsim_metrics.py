"""`gradcomp fedsim --metrics-port`: the simulated job's coordinator metrics over real HTTP, the same
families `gradcomp serve` exports, with values that match the run's results.json, in process and
with `--grpc` (where the job's coordinator must not bind a /metrics port of its own)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, write_yaml
from prometheus_client.parser import text_string_to_metric_families

from gradcomp import metrics

pytestmark = pytest.mark.server

ROUNDS, PER_ROUND = 3, 2


def _scrape(port: int) -> dict[str, float]:
    """Unlabelled samples by name, plus one `family:NAME` entry per metric family on the page."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            families = list(text_string_to_metric_families(resp.read().decode()))
    except OSError:
        return {}
    out = {s.name: s.value for fam in families for s in fam.samples if not s.labels}
    return out | {f"family:{fam.name}": 1.0 for fam in families}


@pytest.mark.parametrize("grpc", [False, True], ids=["in-process", "grpc"])
def test_fedsim_exports_the_coordinator_metrics(tmp_path: Path, grpc: bool) -> None:
    port = free_port()
    job = {
        "name": "fedsim-metrics",
        "task": {"name": "digits-mlp"},
        "rounds": ROUNDS,
        "clients": {"expected": 4},
        "round": {"fraction": PER_ROUND / 4, "min_clients": PER_ROUND},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "compression": "rtopk(ratio=0.1, r=0.3) | ef",
        "privacy": {"mode": "local", "clip": 2.0, "noise_multiplier": 0.5, "delta": 1e-5},
        # the test reads the final values, then stops it; the job's own metrics_port gives way to the flag's
        "server": {"metrics_linger_seconds": 120, "metrics_port": port},
        "simulation": {"actors": 0},  # clients train in the driver: no Ray needed
    }
    path = write_yaml(tmp_path / "fed.yaml", job)
    argv = [sys.executable, "-m", "gradcomp.cli", "fedsim", str(path), "--runs-dir", str(tmp_path), "--metrics-port"]
    argv += [str(port), "--grpc"] if grpc else [str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end, seen = time.monotonic() + 180, {}
        while seen.get("gradcomp_fed_round") != ROUNDS or not (tmp_path / job["name"] / "results.json").is_file():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < end, f"fedsim did not finish {ROUNDS} rounds: {seen}"
            time.sleep(0.5)
            seen = _scrape(port)
        results = json.loads((tmp_path / job["name"] / "results.json").read_text())
        while results["finished_at"] is None:  # the last round is logged before the run is closed
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < end, "fedsim logged its last round but never closed the run"
            time.sleep(0.2)
            results = json.loads((tmp_path / job["name"] / "results.json").read_text())
        seen = _scrape(port)
        assert seen, f"the final scrape of 127.0.0.1:{port} failed"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert seen["gradcomp_fed_updates_accepted_total"] == ROUNDS * PER_ROUND
    assert seen["gradcomp_fed_rounds_completed_total"] == ROUNDS
    assert seen["gradcomp_fed_uplink_bytes_total"] == results["bytes_sent"] > 0
    assert seen["gradcomp_fed_uplink_dense_bytes_total"] == results["dense_bytes"]
    assert seen["gradcomp_fed_privacy_epsilon"] == results["epsilon"] > 0
    last_eval = [h for h in results["history"] if "test_accuracy" in h][-1]
    assert seen["gradcomp_fed_global_test_accuracy"] == last_eval["test_accuracy"]
    if grpc:  # the simulated clients' RPCs went through the real gRPC service
        assert any(name.startswith("family:gradcomp_fed_rpcs") for name in seen)
    # every family `gradcomp serve` exports (the training ones are on the page too, without series)
    served = {m.name for m in metrics.REGISTRY.collect() if m.name.startswith("gradcomp_fed_")}
    assert {f"family:{name}" for name in served} <= set(seen)
