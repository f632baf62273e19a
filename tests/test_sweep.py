"""The sweep tool: grid expansion, resumability, results.csv, report and valid PNG plots."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradcomp.config.common import ConfigError
from gradcomp.config.sweep import SweepJob
from gradcomp.study import sweep as sweep_mod
from gradcomp.study.cells import expand

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BASE = {
    "name": "base",
    "task": {"name": "digits-mlp"},
    "rounds": 2,
    "clients": {"expected": 10},
    "round": {"fraction": 0.5, "min_clients": 3, "deadline_seconds": 10},
    "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "compression": "none",
    "seed": 0,
    "simulation": {"partition": "iid", "actors": 0},
}

SWEEP = {
    "name": "tiny",
    "base": "base.yaml",
    "runner": "fedsim",
    "set": {"rounds": 3},
    "specs": ["none", {"name": "topk+ef", "spec": "topk(ratio=0.1) | ef"}],
    "privacy": [
        {"name": "non-private"},
        {"name": "dp", "set": {"privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 0.5}}},
    ],
    "seeds": [0],
    "target_accuracy": 0.3,
}


def _write(tmp_path: Path, **changes: Any) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    data = {**SWEEP, **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _args(path: Path, tmp_path: Path, *overrides: str, check: bool = False) -> argparse.Namespace:
    return argparse.Namespace(
        sweep=str(path), overrides=list(overrides), address=None, runs_dir=str(tmp_path / "runs"), check=check
    )


class CountingRunner:
    """The real fedsim runner, recording which cells it ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.ran: list[str] = []
        self.inner = sweep_mod.RUNNERS["fedsim"]
        monkeypatch.setitem(sweep_mod.RUNNERS, "fedsim", self)

    def check(self, job: dict[str, Any], source: str) -> None:
        self.inner.check(job, source)

    def run(self, job: dict[str, Any], source: str, runs_dir: Path, address: str | None) -> None:
        self.ran.append(job["name"])
        self.inner.run(job, source, runs_dir, address)


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    import matplotlib.image as mpimg
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert mpimg.imread(str(path)).ndim == 3


def test_expand_grid_specs_privacy_seeds(tmp_path: Path) -> None:
    sweep = SweepJob.model_validate(
        {**SWEEP, "seeds": [0, 1], "grid": {"simulation.partition": ["iid", "dirichlet(alpha=0.5)"]}}
    )
    cells = expand(sweep, BASE)
    assert len(cells) == 2 * 2 * 2 * 2
    assert cells[0].spec.name == "none" and cells[0].privacy.name == "non-private"  # baseline first
    ids = {c.cell_id for c in cells}
    assert len(ids) == len(cells)
    dp = next(c for c in cells if c.privacy.name == "dp" and c.spec.name == "topk+ef")
    assert dp.job["privacy"] == {"mode": "central", "clip": 1.0, "noise_multiplier": 0.5}
    assert dp.job["compression"] == "topk(ratio=0.1) | ef"
    assert dp.job["simulation"] == {"partition": dp.grid["simulation.partition"], "actors": 0}  # merged, not replaced
    assert dp.job["rounds"] == 3 and dp.job["name"] == dp.cell_id


def test_local_dp_stage_goes_first() -> None:
    sweep = SweepJob.model_validate(
        {**SWEEP, "privacy": [{"name": "ldp", "stage": "dp(clip=1.0, sigma=0.5)", "set": {"privacy.mode": "local"}}]}
    )
    specs = {c.spec.name: c.full_spec for c in expand(sweep, BASE)}
    assert specs["none"].startswith("dp(clip=1.0, sigma=0.5")
    assert specs["topk+ef"].startswith("dp(") and specs["topk+ef"].endswith("topk(ratio=0.1) | ef")


def test_bad_sweeps_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid jobs") as bad_grid:
        sweep_mod.run_sweep(_args(_write(tmp_path, grid={"round.fraction": [0.5, 7]}), tmp_path))
    message = str(bad_grid.value)
    assert "4 cell(s)" in message and "cell none__non-private__seed0__fraction-7: invalid job file" in message
    assert "round.fraction: Input should be less than or equal to 1 (got 7)" in message
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="unknown stage"):
        sweep_mod.run_sweep(_args(_write(tmp_path, specs=["nosuch(1)"]), tmp_path))
    with pytest.raises(ConfigError, match="duplicate"):
        sweep_mod.run_sweep(_args(_write(tmp_path, specs=["none", "none"]), tmp_path))
    staged = [{"name": "ldp", "stage": "dp(clip=1.0, sigma=0.5)"}]
    with pytest.raises(ConfigError, match="refused in data-parallel training specs"):
        sweep_mod.run_sweep(_args(_write(tmp_path, runner="train", privacy=staged), tmp_path))
    assert sweep_mod.run_sweep(_args(_write(tmp_path), tmp_path, check=True)) == 0


def test_sweep_runs_resumes_and_writes_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path)
    counter = CountingRunner(monkeypatch)
    assert sweep_mod.run_sweep(_args(path, tmp_path)) == 0
    assert len(counter.ran) == 4
    out = tmp_path / "runs" / "tiny"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    for r in rows:
        assert 0 <= float(r["final_accuracy"]) <= 1 and int(r["uplink_bytes"]) > 0
        assert (r["epsilon"] != "") == (r["privacy"] == "dp")
    dense = next(r for r in rows if r["spec_name"] == "none" and r["privacy"] == "non-private")
    topk = next(r for r in rows if r["spec_name"] == "topk+ef" and r["privacy"] == "non-private")
    assert int(dense["uplink_bytes"]) > 3 * int(topk["uplink_bytes"])
    report = (out / "report.md").read_text()
    assert "none / non-private **(baseline)**" in report and "rounds to 0.3" in report
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_epsilon.png", "accuracy_over_rounds.png"):
        _png_ok(out / name)
        assert f"]({name})" in report

    # Run again: every cell is finished, nothing runs.
    counter.ran.clear()
    assert sweep_mod.run_sweep(_args(path, tmp_path)) == 0
    assert counter.ran == []
    # A cell that did not finish (no done.json, half-written run dir) is the only one that runs again.
    victim = out / "cells" / rows[2]["cell"]
    (victim / "done.json").unlink()
    (victim / "runs" / "junk.txt").write_text("half a run")
    assert sweep_mod.run_sweep(_args(path, tmp_path)) == 0
    assert counter.ran == [rows[2]["cell"]]
    assert not (victim / "runs" / "junk.txt").exists()
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 4
    # Changing a setting of the study reruns the cells it changes, not the others.
    counter.ran.clear()
    assert sweep_mod.run_sweep(_args(path, tmp_path, "privacy=[{name: non-private}]", "set.rounds=2")) == 0
    assert sorted(counter.ran) == sorted(r["cell"] for r in rows if r["privacy"] == "non-private")


def test_failed_cell_is_reported_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, privacy=[{"name": "non-private"}])
    real = sweep_mod.RUNNERS["fedsim"]

    class Flaky:
        check = real.check

        def run(self, job: dict[str, Any], source: str, runs_dir: Path, address: str | None) -> None:
            if "topk" in job["name"]:
                raise RuntimeError("boom")
            real.run(job, source, runs_dir, address)

    monkeypatch.setitem(sweep_mod.RUNNERS, "fedsim", Flaky())
    assert sweep_mod.run_sweep(_args(path, tmp_path)) == 1
    out = tmp_path / "runs" / "tiny"
    rows = {r["spec_name"]: r["status"] for r in csv.DictReader((out / "results.csv").open())}
    assert rows == {"none": "done", "topk+ef": "failed"}
    assert "failed cells" in (out / "report.md").read_text()
    monkeypatch.setitem(sweep_mod.RUNNERS, "fedsim", real)
    assert sweep_mod.run_sweep(_args(path, tmp_path)) == 0
    rows = {r["spec_name"]: r["status"] for r in csv.DictReader((out / "results.csv").open())}
    assert rows == {"none": "done", "topk+ef": "done"}


@pytest.mark.ray
def test_train_runner_sweep_trains_each_cell_on_ray(tmp_path: Path) -> None:
    """`runner: train`: every cell is a real `gradcomp train` on the local Ray (1 epoch, 2 workers)."""
    import ray

    base = {
        "name": "base",
        "task": "digits-mlp",
        "epochs": 1,
        "batch_size": 16,
        "optimizer": {"name": "momentum", "lr": 0.05, "momentum": 0.9},
        "compression": "none",
        "scaling": {"num_workers": 2},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "dp-train",
        "base": "base.yaml",
        "runner": "train",
        "specs": ["none", {"name": "rtopk+ef", "spec": "rtopk(ratio=0.01, r=0.05) | ef"}],
        "seeds": [0],
        "target_accuracy": 0.5,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    try:
        assert sweep_mod.run_sweep(_args(path, tmp_path)) == 0
    finally:
        ray.shutdown()
    out = tmp_path / "runs" / "dp-train"
    rows = {r["spec_name"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"none", "rtopk+ef"} and all(r["status"] == "done" for r in rows.values())
    assert all(float(r["final_accuracy"]) > 0.3 for r in rows.values())  # chance is 0.1, after one epoch
    assert int(rows["none"]["uplink_bytes"]) > 30 * int(rows["rtopk+ef"]["uplink_bytes"])
    assert "epochs to 0.5" in (out / "report.md").read_text()
    _png_ok(out / "accuracy_over_epochs.png")


def test_leakage_column_audits_each_distinct_spec_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcomp.study import leakage as leakage_mod

    audited: list[str] = []
    real_audit = leakage_mod.audit_specs

    def counting(specs, config):  # type: ignore[no-untyped-def]
        audited.extend(specs)
        return real_audit(specs, config)

    monkeypatch.setattr(leakage_mod, "audit_specs", counting)
    local = {"name": "ldp", "stage": "dp(clip=1.0, sigma=0.5)", "set": {"privacy": {"mode": "local"}}}
    path = _write(
        tmp_path,
        set={"rounds": 1},
        specs=["none"],
        privacy=[{"name": "non-private"}, local],
        seeds=[0, 1],
        leakage={"victims": 4, "batch_sizes": [1], "iterations": 20, "settings": ["init"]},
    )
    assert sweep_mod.run_sweep(_args(path, tmp_path)) == 0
    assert len(audited) == 2 and "none" in audited and audited[1].startswith("dp(clip=1.0, sigma=0.5")  # 4 cells
    out = tmp_path / "runs" / "tiny"
    rows = list(csv.DictReader((out / "results.csv").open()))
    verdicts = {r["privacy"]: (r["leakage"], float(r["leak_reidentification"])) for r in rows}
    assert verdicts["non-private"] == ("leaks", 1.0)
    assert verdicts["ldp"][0] == "resists" and verdicts["ldp"][1] <= 0.2
    report = (out / "report.md").read_text()
    assert "leakage (audit)" in report and "leaks (re-id 1.00" in report and "not a proof of privacy" in report
    audited.clear()
    assert sweep_mod.run_sweep(_args(path, tmp_path)) == 0
    assert audited == []  # cached in leakage.json
