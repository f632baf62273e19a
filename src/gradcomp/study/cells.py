"""Expand a sweep into cells (one job file each) and keep track of which have finished.

A cell is a directory `<sweep dir>/cells/<cell id>/` holding the job it ran (`job.yaml`),
the run's own `runs/<name>/results.json`, and `done.json` once it finished. A cell with
`done.json` is skipped when the sweep is started again; a cell without it is run from
scratch (a half-written run directory is removed first).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradcomp.config.common import ConfigError, load_yaml, set_dotted
from gradcomp.config.sweep import PrivacyEntry, SpecEntry, SweepJob
from gradcomp.results import atomic_write_json


@dataclass
class Cell:
    """One point of the grid and the job data that runs it."""

    cell_id: str
    spec: SpecEntry
    privacy: PrivacyEntry
    seed: int
    grid: dict[str, Any]
    job: dict[str, Any]
    full_spec: str
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        """Spec x privacy label (seeds and grid values aside): one line in a plot."""
        return f"{self.spec.name} / {self.privacy.name}"


def flatten_dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'simulation': {'actors': 0}} -> {'simulation.actors': 0}: a nested override changes only the keys it
    names, never a whole section."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_dotted(value, full + "."))
        else:
            out[full] = value
    return out


def combine_spec(privacy: PrivacyEntry, spec: SpecEntry) -> str:
    """Local DP: the dp stage goes first (clip and noise before any selection keeps the order sound)."""
    if privacy.stage is None:
        return spec.spec
    if spec.spec == "none":
        return privacy.stage
    return f"{privacy.stage} | {spec.spec}"


def _token(value: Any) -> str:
    """A piece of a cell id: letters, digits, '.', '_' and '-' only (job names and directories allow no more)."""
    text = str(value).replace("+", "_").replace("=", "-").replace("|", "_")
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text) or "x"


def expand(sweep: SweepJob, base: dict[str, Any]) -> list[Cell]:
    """Every cell of specs x privacy x seeds x grid, in a stable order (the baseline first)."""
    keys = list(sweep.grid)
    combos = list(itertools.product(*(sweep.grid[k] for k in keys))) or [()]
    specs = sorted(sweep.specs, key=lambda s: s.name != sweep.baseline_name)
    cells = []
    for spec, privacy, seed, combo in itertools.product(specs, sweep.privacy, sweep.seeds, combos):
        job = copy.deepcopy(base)
        for key, value in flatten_dotted(sweep.set).items():
            set_dotted(job, key, value)
        for key, value in flatten_dotted(privacy.set).items():
            set_dotted(job, key, value)
        grid = dict(zip(keys, combo, strict=True))
        for key, value in grid.items():
            set_dotted(job, key, value)
        full = combine_spec(privacy, spec)
        set_dotted(job, sweep.spec_key_or_default, full)
        set_dotted(job, sweep.seed_key_or_default, seed)
        parts = [spec.name, privacy.name, f"seed{seed}"] + [f"{k.split('.')[-1]}-{_token(v)}" for k, v in grid.items()]
        cell_id = "__".join(_token(p) for p in parts)
        set_dotted(job, "name", cell_id)
        cells.append(Cell(cell_id, spec, privacy, seed, grid, job, full))
    ids = [c.cell_id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"sweep {sweep.name!r}: grid values give the same cell id twice: {dup}")
    return cells


def load_base(sweep: SweepJob, sweep_file: str | Path) -> dict[str, Any]:
    path = sweep.base_path(sweep_file)
    if not path.is_file():
        raise ConfigError(f"{sweep_file}: base job {sweep.base!r} not found (looked at {path})")
    return load_yaml(path)


class CellStore:
    """The sweep directory: which cells are done, their results, and a clean slate for the rest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def cell_dir(self, cell: Cell) -> Path:
        return self.root / "cells" / cell.cell_id

    def is_done(self, cell: Cell) -> bool:
        """Finished, and with the job this sweep would run now (a changed grid or `set` reruns the cell)."""
        d = self.cell_dir(cell)
        if not (d / "done.json").is_file():
            return False
        try:
            return yaml.safe_load((d / "job.yaml").read_text()) == cell.job
        except (OSError, yaml.YAMLError):
            return False

    def is_stale(self, cell: Cell) -> bool:
        """Finished earlier, but with a different job."""
        return (self.cell_dir(cell) / "done.json").is_file() and not self.is_done(cell)

    def prepare(self, cell: Cell) -> Path:
        """Wipe a cell that did not finish and write its job file; returns the job file path."""
        d = self.cell_dir(cell)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        path = d / "job.yaml"
        path.write_text(yaml.safe_dump(cell.job, sort_keys=False))
        return path

    def runs_dir(self, cell: Cell) -> Path:
        return self.cell_dir(cell) / "runs"

    def results_path(self, cell: Cell) -> Path | None:
        found = sorted(self.runs_dir(cell).glob("*/results.json"))
        return found[0] if found else None

    def mark_done(self, cell: Cell) -> None:
        path = self.results_path(cell)
        if path is None:
            raise RuntimeError(f"cell {cell.cell_id}: the run wrote no results.json under {self.runs_dir(cell)}")
        atomic_write_json(self.cell_dir(cell) / "done.json", {"cell": cell.cell_id, "results": str(path)})

    def load_results(self, cell: Cell) -> dict[str, Any] | None:
        if not self.is_done(cell):
            return None
        path = self.results_path(cell)
        return json.loads(path.read_text()) if path is not None else None
