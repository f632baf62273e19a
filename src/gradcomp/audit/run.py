"""`gradcomp audit`: run the attacks on each spec's payloads and judge the leakage.

`audit_specs(specs, config)` is the library entry (the sweep calls it); `run_audit(args)` is
the CLI verb: it adds the terminal table, the JSON file and the PNG grid.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gradcomp.audit import metrics
from gradcomp.audit.analytic import analytic_attack, applicable
from gradcomp.audit.config import AuditConfig, SpecAudit
from gradcomp.audit.cosine import cosine_attack
from gradcomp.audit.dlg import l2_attack
from gradcomp.audit.observe import Observation, Setting, make_setting, observe
from gradcomp.audit.text import audit_text
from gradcomp.errors import UserError
from gradcomp.tasks import load_task

Attack = Callable[[Observation, int, int], torch.Tensor]
ATTACKS: dict[str, Attack] = {
    "analytic": lambda obs, iterations, seed: analytic_attack(obs),
    "cosine-tv": cosine_attack,
    "dlg-l2": l2_attack,
}
NOT_APPLICABLE: dict[str, Callable[[Observation], str | None]] = {"analytic": applicable}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads: these problems are small, and extra threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def audit_specs(specs: Sequence[str], config: AuditConfig = AuditConfig()) -> list[SpecAudit]:
    """Audit each spec in the same setting (model, victims); one `SpecAudit` per spec, in order."""
    task = load_task(config.task, **config.task_args)
    setting = make_setting(task, config.victims, config.seed)
    with _threads(1):
        return [audit_one(setting, spec, config) for spec in specs]


def audit_one(setting: Setting, spec: str, config: AuditConfig) -> SpecAudit:
    """All attacks at every batch size on one spec, the baseline, cosine, epsilon and verdict."""
    if not setting.test_x.is_floating_point():  # token ids: the text attack, not the image attacks
        return audit_text(setting, spec, config, list(ATTACKS))
    t0 = time.perf_counter()
    attacks: dict[str, dict[str, Any]] = {name: {"by_batch_size": {}} for name in ATTACKS}
    images: dict[tuple[str, int], torch.Tensor] = {}
    cosines: dict[str, float] = {}
    base: dict[str, float] = {}
    span = setting.bounds[1] - setting.bounds[0]
    for batch in config.batch_sizes:
        obs, truth = observe(setting, spec, batch, config.seed)
        cosines[str(batch)] = truth.cosine(obs.observed)
        base = metrics.baseline(setting.mean_image, truth.victims, truth.victim_ids, setting.test_x, span)
        for name, attack in ATTACKS.items():
            why = NOT_APPLICABLE[name](obs) if name in NOT_APPLICABLE else None
            if why is not None:
                attacks[name] = {"applicable": False, "reason": why}
                continue
            t = time.perf_counter()
            recon = attack(obs, config.iterations, config.seed)
            figures = metrics.score(recon, truth.victims, truth.victim_ids, setting.test_x, span)
            attacks[name]["by_batch_size"][str(batch)] = {**figures, "seconds": round(time.perf_counter() - t, 3)}
            images[(name, batch)] = metrics.match(recon, truth.victims).reshape(-1, *obs.input_shape)
    for figures in attacks.values():
        _summarise(figures)
    reid, psnr, worst_attack = metrics.worst(attacks)
    entry = {
        "spec": spec,
        "verdict": metrics.verdict(reid, psnr, base["psnr_db"]),
        "reidentification": reid,
        "psnr_db": psnr,
        "worst_attack": worst_attack,
        "attacks": attacks,
        "baseline_mean_image": base,
        "gradient_cosine": cosines,
        "dp": metrics.dp_epsilon(spec),
        "thresholds": metrics.THRESHOLDS,
        "setup": {
            "task": config.task,
            "task_args": config.task_args,
            "victims": len(setting.victim_ids),
            "batch_sizes": list(config.batch_sizes),
            "iterations": config.iterations,
            "seed": config.seed,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return SpecAudit(entry, setting.test_x[setting.victim_ids], images)


def _summarise(figures: dict[str, Any]) -> None:
    """An attack's headline figures: its worst case over the batch sizes."""
    runs = list(figures.get("by_batch_size", {}).values())
    if not runs:
        return
    figures["reidentification"] = max(r["reidentification"] for r in runs)
    figures["psnr_db"] = max(r["psnr_db"] for r in runs)
    figures["mse"] = min(r["mse"] for r in runs)


def _task_args(args: argparse.Namespace) -> dict[str, Any]:
    """`--task-arg KEY=VALUE` pairs, each value read as YAML (numbers, booleans, strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in getattr(args, "task_arg", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--task-arg wants KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_audit(args: argparse.Namespace) -> int:
    """CLI verb: audit, print the table, write the JSON and the PNG grid beside it."""
    from gradcomp.audit.report import print_table, write_grid, write_json

    config = AuditConfig(
        task=args.task,
        task_args=_task_args(args),
        batch_sizes=tuple(args.batch_size or AuditConfig.batch_sizes),
        victims=args.victims,
        iterations=args.iterations,
        seed=args.seed,
    )
    for spec in args.spec:  # fail on a bad spec before any attack runs
        metrics.dp_epsilon(spec)
    audits = audit_specs(args.spec, config)
    out = Path(args.out)
    write_json(out, [a.entry for a in audits])
    png = write_grid(out.with_suffix(".png"), audits)
    print_table([a.entry for a in audits])
    print(f"\nwrote {out} and {png}")
    return 0
