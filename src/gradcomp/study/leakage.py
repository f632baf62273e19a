"""The sweep's optional leakage column: each distinct (task, spec) of the grid is audited once
(`gradcomp.audit`), and the figures are kept in `<sweep dir>/leakage.json` so a re-run of the
sweep audits only specs it has not seen under the same audit settings.

The audited spec is the one the cell's clients (or workers) put on the wire, so a central-DP
cell, whose noise is added by the coordinator after it has seen the updates, is audited
without that noise: against the coordinator it leaks as much as its spec does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradcomp.audit import AuditConfig, audit_specs
from gradcomp.config.sweep import LeakageConfig
from gradcomp.results import atomic_write_json
from gradcomp.study.cells import Cell

LEAKAGE_FILE = "leakage.json"
SUMMARY_KEYS = ("verdict", "reidentification", "psnr_db", "worst_attack", "worst_setting", "token_recovery")


def _task(cell: Cell) -> tuple[str, dict[str, Any]]:
    task = cell.job.get("task", "digits-mlp")
    if isinstance(task, dict):
        return str(task["name"]), dict(task.get("args") or {})
    return str(task), {}


def _key(task: str, args: dict[str, Any], spec: str, cfg: LeakageConfig) -> str:
    """The cache key: everything the audit's figures depend on, its fixed settings included (an entry
    cached by an audit that attacked fewer settings is not reused)."""
    fixed = AuditConfig()
    settings = [fixed.trained_epochs, fixed.local_epochs, fixed.local_batch_size, fixed.local_lr]
    return json.dumps([task, args, spec, cfg.model_dump(mode="json"), settings], sort_keys=True)


def leakage_by_cell(cells: Sequence[Cell], cfg: LeakageConfig, root: Path) -> dict[str, dict[str, Any]]:
    """cell id -> the audit's headline figures for its spec; audits only (task, spec) pairs not cached."""
    path = root / LEAKAGE_FILE
    cache: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    by_cell: dict[str, str] = {}
    todo: dict[str, tuple[str, dict[str, Any], str]] = {}
    for cell in cells:
        task, args = _task(cell)
        key = _key(task, args, cell.full_spec, cfg)
        by_cell[cell.cell_id] = key
        if key not in cache:
            todo[key] = (task, args, cell.full_spec)
    for key, (task, args, spec) in todo.items():
        config = AuditConfig(
            task=task,
            task_args=args,
            batch_sizes=tuple(cfg.batch_sizes),
            victims=cfg.victims,
            iterations=cfg.iterations,
            settings=tuple(dict.fromkeys(cfg.settings)),
        )
        entry = audit_specs([spec], config)[0].entry
        cache[key] = {k: entry.get(k) for k in ("spec", *SUMMARY_KEYS)}
        atomic_write_json(path, cache)  # after every audit: an interrupted sweep keeps what it audited
    return {cell_id: cache[key] for cell_id, key in by_cell.items()}
