"""Federated simulation: learning on a Ray actor pool, real byte counts, heterogeneity rules, gRPC mode."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_yaml

from gradcomp import metrics
from gradcomp._proto import fed_pb2
from gradcomp.cli import main
from gradcomp.compression import encode, from_fields
from gradcomp.protocol.messages import update_fields
from gradcomp.raycluster import connect
from gradcomp.sim.client import ClientJob, ClientResult
from gradcomp.sim.pool import ClientPool
from gradcomp.sim.setup import build_simulation, load_fedsim_job, make_pool
from gradcomp.sim.state import client_dropouts

BASE: dict[str, Any] = {
    "name": "t",
    "task": {"name": "digits-mlp"},
    "rounds": 4,
    "clients": {"expected": 20},
    "round": {"fraction": 0.5, "min_clients": 5, "deadline_seconds": 10, "max_retries": 3},
    "local": {"epochs": 2, "batch_size": 16, "lr": 0.1},
    "compression": "rtopk(ratio=0.1, r=0.3) | ef",
    "seed": 0,
    "simulation": {"partition": "iid", "actors": 0},
}


def _job_file(tmp_path: Path, **changes: Any) -> Path:
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        node = data
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return write_yaml(tmp_path / "fed.yaml", data)


class Recording:
    """Wraps a pool and keeps every result, to check the coordinator's counters against."""

    def __init__(self, inner: ClientPool):
        self.inner, self.size, self.results = inner, inner.size, []

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        out = self.inner.run(jobs, model, version)
        self.results.extend(out)
        return out

    def peak_rss(self) -> list[int]:
        return self.inner.peak_rss()

    def close(self) -> None:
        self.inner.close()


def _encoded_size(res: ClientResult) -> int:
    """Bytes of the update as the compression wire format encodes it, recomputed from the message."""
    upd = update_fields(fed_pb2.SubmitUpdateRequest.FromString(res.request))
    return sum(len(encode(from_fields(f))) for f in upd.values())


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_simulation_learns_and_counts_real_bytes(tmp_path: Path, ray_local: Any) -> None:
    job = load_fedsim_job(_job_file(tmp_path, simulation__actors=2))
    pool = Recording(make_pool(job, 2))
    sim, _ = build_simulation(job, pool=pool, quiet=True)
    before = metrics.value("gradcomp_fed_uplink_bytes_total")
    entries = []
    sim.run(lambda e, s: entries.append(e))
    pool.close()
    assert sim.coord.status == "finished" and len(entries) == 4
    acc = [e["test_accuracy"] for e in entries]
    assert acc[-1] > acc[0] + 0.25, acc
    assert len(pool.results) == 4 * 10  # no dropouts here: every selected client reported once
    encoded = sum(_encoded_size(r) for r in pool.results)
    assert encoded == sum(r.payload_bytes for r in pool.results)
    assert sim.coord.totals["uplink_bytes"] == encoded == sum(e["uplink_bytes"] for e in entries)
    assert metrics.value("gradcomp_fed_uplink_bytes_total") - before == encoded
    # rtopk at 10% with int32 indices: well under a third of the dense bytes
    assert sim.coord.totals["dense_bytes"] > 3 * encoded

    # The same job in the driver (no Ray) gives the same run: state lives outside the actors.
    local, _ = build_simulation(load_fedsim_job(_job_file(tmp_path)), quiet=True)
    again = []
    local.run(lambda e, s: again.append(e["test_accuracy"]))
    assert again == acc


def test_dropout_stragglers_deadline_and_retry(tmp_path: Path) -> None:
    # 30% stragglers whose updates always come 100 s late against a 10 s deadline, 20% dropouts:
    # rounds close at the deadline, late updates are refused as stale, short rounds are retried.
    path = _job_file(
        tmp_path,
        rounds=5,
        round={"fraction": 0.5, "min_clients": 6, "deadline_seconds": 10, "max_retries": 5},
        simulation={
            "partition": "dirichlet(alpha=0.5)",
            "actors": 0,
            "dropout": 0.2,
            "stragglers": {"fraction": 0.3, "delay": "fixed", "mean_seconds": 100},
        },
    )
    job = load_fedsim_job(path)
    sim, _ = build_simulation(job, quiet=True)
    rows = []
    sim.run(lambda e, s: rows.append((e, s)))
    assert sim.coord.status == "finished" and len(rows) == 5
    late = sum(s.late for _, s in rows)
    dropped = sum(s.dropped for _, s in rows)
    assert late > 0 and dropped > 0
    assert sim.coord.totals["rejected"] == late  # every late update was refused, nothing else was
    assert any(e["attempts"] > 1 for e, _ in rows), "some round should have been retried"
    for e, _ in rows:
        assert e["clients"] >= 6  # the minimum-client rule held
        assert e["round_seconds"] >= 10 or e["clients"] == e["selected"]
    trained = sum(s.trained for _, s in rows)
    assert trained == sim.coord.totals["accepted"] + late


def test_heterogeneous_dropout_is_drawn_per_client() -> None:
    same = client_dropouts(50, 0.3, 0.0, seed=1)
    assert np.all(same == 0.3)
    p = client_dropouts(20_000, 0.3, 0.5, seed=1)
    assert p.min() >= 0 and p.max() <= 1
    assert p.mean() == pytest.approx(0.3, abs=0.01)
    assert p.var() == pytest.approx(0.5 * 0.3 * 0.7, rel=0.05)
    assert np.array_equal(p, client_dropouts(20_000, 0.3, 0.5, seed=1))
    assert not np.array_equal(p, client_dropouts(20_000, 0.3, 0.5, seed=2))
    with pytest.raises(ValueError, match="dropout_spread"):
        client_dropouts(3, 0.3, 1.0, seed=0)


def test_heterogeneous_dropout_shapes_who_takes_part(tmp_path: Path) -> None:
    # spread 0.8 around 0.4: most clients are nearly always there or nearly never.
    path = _job_file(
        tmp_path,
        rounds=6,
        # bench_rounds 0: every client is asked every round, so participation measures the dropout draw alone
        round={"fraction": 1.0, "min_clients": 1, "deadline_seconds": 10, "max_retries": 0, "bench_rounds": 0},
        simulation={"partition": "iid", "actors": 0, "dropout": 0.4, "dropout_spread": 0.8},
    )
    sim, _ = build_simulation(load_fedsim_job(path), quiet=True)
    probs = np.array([c.dropout for c in sim.clients.clients])
    assert probs.std() > 0.3, "the population is split, not uniform"
    rows = []
    sim.run(lambda e, s: rows.append(s))
    taken = np.array([c.participations for c in sim.clients.clients])
    assert taken.sum() == sum(s.trained for s in rows)
    assert sum(s.dropped for s in rows) == 6 * 20 - taken.sum()
    assert np.corrcoef(1 - probs, taken)[0, 1] > 0.8, (probs.round(2), taken)


def test_min_clients_unmet_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _job_file(
        tmp_path,
        round={"fraction": 0.5, "min_clients": 9, "deadline_seconds": 5, "max_retries": 1},
        simulation={"partition": "iid", "actors": 0, "dropout": 0.9},
    )
    assert main(["fedsim", str(path), "--runs-dir", str(tmp_path / "runs")]) == 1
    res = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    assert res["final"]["status"] == "failed"
    assert "the job failed" in capsys.readouterr().out


def test_cli_check_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fedsim", "examples/fedsim-digits.yaml", "--check"]) == 0
    assert "ok" in capsys.readouterr().out
    bad = _job_file(tmp_path, simulation={"partition": "dirichlet(alpha=-1)"})
    assert main(["fedsim", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "simulation" in err and "alpha" in err
    clash = _job_file(tmp_path, simulation={"clients": 30})
    assert main(["fedsim", str(clash)]) == 2
    assert "simulation.clients (30)" in capsys.readouterr().err


def test_cli_run_writes_results(tmp_path: Path) -> None:
    path = _job_file(tmp_path, rounds=2, clients={"expected": 10}, simulation={"actors": 0, "clients": None})
    assert main(["fedsim", str(path), "--runs-dir", str(tmp_path / "runs"), "--set", "round.min_clients=3"]) == 0
    res = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    assert res["kind"] == "fedsim" and len(res["history"]) == 2
    assert res["bytes_sent"] == sum(e["uplink_bytes"] for e in res["history"]) > 0
    assert 0 <= res["final"]["accuracy"] <= 1


@pytest.mark.server
def test_grpc_mode_against_the_real_service(tmp_path: Path) -> None:
    path = _job_file(
        tmp_path,
        rounds=2,
        clients={"expected": 8},
        round={"fraction": 0.5, "min_clients": 3, "deadline_seconds": 20},
        simulation={"actors": 0, "grpc": True},
    )
    args = argparse.Namespace(job=str(path), overrides=[], runs_dir=str(tmp_path / "runs"), check=False, progress=False)
    from gradcomp.sim.run import run_fedsim

    assert run_fedsim(args) == 0
    res = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    final = res["final"]
    assert res["kind"] == "fedsim" and final["transport"] == "grpc" and final["rounds"] == 2
    assert final["training"] == "vectorised" and final["sequential_reason"] is None
    assert final["updates_accepted"] == 8 and final["updates_trained"] == 8, final
    # what the clients put on the wire is what the coordinator counted
    assert res["bytes_sent"] == final["uplink_sent_bytes_total"]
    assert final["downlink_bytes_total"] > 0
