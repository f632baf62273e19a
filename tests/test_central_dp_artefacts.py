"""Central client-level DP protects a client's data against whoever sees the released models and
what the run writes; the clients' example counts and training losses reach the coordinator without
noise. They used to go into every round's log entry, so into results.json, the checkpoint and each
sweep cell, outside the guarantee and unsaid. Now they stay out unless the job sets
`privacy.unprotected_metrics: true`. Each check searches every file a real run wrote."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradcomp.cli import main
from gradcomp.config.fed import FedJob
from gradcomp.server import store
from gradcomp.study import sweep as sweep_mod

BASE: dict[str, Any] = {
    "name": "c",
    "task": {"name": "synthetic", "args": {"num_params": 300, "num_examples": 200, "input_dim": 8}},
    "rounds": 2,
    "clients": {"expected": 6},
    "round": {"fraction": 0.5, "min_clients": 2, "deadline_seconds": 10},
    "local": {"epochs": 1, "batch_size": 8, "lr": 0.1},
    "compression": "none",
    "seed": 0,
    "simulation": {"partition": "iid", "actors": 0},
}
CENTRAL = {"mode": "central", "clip": 1.0, "noise_multiplier": 1.0}
CLAIMS = (b'"examples"', b'"train_loss"')  # the round log's keys for the clients' claims


def _found(where: Path) -> set[bytes]:
    """Which of the claims' keys appear in any file under `where`."""
    found = [_found_in(p) for p in where.rglob("*") if p.is_file()]
    assert found
    return set().union(*found)


def _found_in(path: Path) -> set[bytes]:
    blob = path.read_bytes()
    return {key for key in CLAIMS if key in blob}


def _fedsim(tmp_path: Path, privacy: dict[str, Any] | None) -> Path:
    """A simulated run against the real gRPC service, which writes the checkpoint `gradcomp serve` does."""
    data = {**BASE, "simulation": {**BASE["simulation"], "grpc": True}}
    data = data if privacy is None else {**data, "privacy": privacy}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    runs = tmp_path / "runs"
    assert main(["fedsim", str(path), "--runs-dir", str(runs)]) == 0
    assert json.loads((runs / "c" / "results.json").read_text())["history"]
    return runs / "c"


@pytest.mark.parametrize(
    ("privacy", "written"),
    [(None, set(CLAIMS)), (CENTRAL, set()), ({**CENTRAL, "unprotected_metrics": True}, set(CLAIMS))],
    ids=["no-dp", "central", "central-unprotected"],
)
def test_central_dp_writes_no_unnoised_client_claims(tmp_path: Path, privacy: dict | None, written: set) -> None:
    run = _fedsim(tmp_path, privacy)
    assert _found(run) == written
    assert _found_in(run / store.FILENAME) == written  # the checkpoint on its own


def test_a_central_dp_sweep_cell_writes_none_either(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "name": "base"}))
    sweep = {
        "name": "s",
        "base": "base.yaml",
        "runner": "fedsim",
        "specs": ["none"],
        "privacy": [{"name": "dp", "set": {"privacy": CENTRAL}}],
        "seeds": [0],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    args = argparse.Namespace(sweep=str(path), overrides=[], address=None, runs_dir=str(tmp_path / "runs"), check=False)
    assert sweep_mod.run_sweep(args) == 0
    cells = tmp_path / "runs" / "s" / "cells"
    assert any(cells.rglob("results.json")) and _found(tmp_path / "runs" / "s") == set()


def test_unprotected_metrics_is_a_central_dp_setting() -> None:
    for mode in ({"mode": "local", "clip": 1.0, "noise_multiplier": 1.0}, {"mode": "none"}):
        with pytest.raises(ValueError, match="unprotected_metrics applies to privacy.mode central"):
            FedJob.model_validate({**BASE, "privacy": {**mode, "unprotected_metrics": True}})
    job = FedJob.model_validate({**BASE, "privacy": {**CENTRAL, "unprotected_metrics": True}})
    assert job.resume_key() == FedJob.model_validate({**BASE, "privacy": CENTRAL}).resume_key()  # resumable either way
