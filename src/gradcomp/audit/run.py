"""`gradcomp audit`: run the attacks on each spec's payloads and judge the leakage.

`audit_specs(specs, config)` is the library entry (the sweep calls it); `run_audit(args)` is
the CLI verb: it adds the terminal table, the JSON file and the PNG grid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
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
from gradcomp.audit.observe import Observation, Setting, Truth, make_setting
from gradcomp.audit.settings import Scenario, scenarios
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
CHANCE_DRAWS = 3  # noise payloads the chance control attacks


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
    """Audit each spec in the same settings (models, victims); one `SpecAudit` per spec, in order."""
    task = load_task(config.task, **config.task_args)
    setting = make_setting(task, config.victims, config.seed)
    with _threads(1):
        if not setting.test_x.is_floating_point():  # token ids: the text attack, at initialisation only
            return [audit_text(setting, spec, config, list(ATTACKS)) for spec in specs]
        settings = scenarios(task, setting, config)
        return [audit_one(settings, spec, config) for spec in specs]


def audit_one(settings: Sequence[Scenario], spec: str, config: AuditConfig) -> SpecAudit:
    """All attacks at every batch size in every setting on one spec; the headline figures and the
    verdict are the worst setting's (highest re-identification, then PSNR)."""
    t0 = time.perf_counter()
    images: dict[tuple[str, int], torch.Tensor] = {}
    by_setting: dict[str, dict[str, Any]] = {}
    for scenario in settings:
        by_setting[scenario.name] = _attack_setting(scenario, spec, config, images)
    base = next(iter(by_setting.values()))["baseline_mean_image"]  # the same victims in every setting
    worst_setting = max(by_setting, key=lambda n: (by_setting[n]["reidentification"], by_setting[n]["psnr_db"]))
    worst = by_setting[worst_setting]
    reid = max(f["reidentification"] for f in by_setting.values())
    psnr = max(f["psnr_db"] for f in by_setting.values())
    entry = {
        "spec": spec,
        "verdict": metrics.verdict(reid, psnr, base["psnr_db"]),
        "reidentification": reid,
        "psnr_db": psnr,
        "worst_attack": worst["worst_attack"],
        "worst_setting": worst_setting,
        "attacks": worst["attacks"],
        "settings": by_setting,
        "baseline_mean_image": base,
        "gradient_cosine": worst["gradient_cosine"],
        "dp": metrics.dp_epsilon(spec),
        "thresholds": metrics.THRESHOLDS,
        "setup": {
            "task": config.task,
            "task_args": config.task_args,
            "victims": len(settings[0].setting.victim_ids),
            "batch_sizes": list(config.batch_sizes),
            "iterations": config.iterations,
            "seed": config.seed,
            "settings": {s.name: s.facts for s in settings},
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    base_setting = settings[0].setting
    return SpecAudit(entry, base_setting.test_x[base_setting.victim_ids], images)


def _attack_setting(
    scenario: Scenario, spec: str, config: AuditConfig, images: dict[tuple[str, int], torch.Tensor]
) -> dict[str, Any]:
    """One setting's figures: every attack at every batch size, its worst case, baseline and verdict;
    the matched reconstructions go into `images` under ("<setting> <attack>", batch size)."""
    setting = scenario.setting
    attacks: dict[str, dict[str, Any]] = {name: {"by_batch_size": {}} for name in ATTACKS}
    cosines: dict[str, float] = {}
    base: dict[str, float] = {}
    span = setting.bounds[1] - setting.bounds[0]
    seen = []
    for batch in config.batch_sizes:
        obs, truth = scenario.observe(spec, batch)
        seen.append((obs, truth))
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
            matched = metrics.match(recon, truth.victims)
            images[(f"{scenario.name} {name}", batch)] = matched.reshape(-1, *obs.input_shape)
    for per_attack in attacks.values():
        _summarise(per_attack)
    reid, psnr, worst_attack = metrics.worst(attacks)
    result: dict[str, Any] = {
        "verdict": metrics.verdict(reid, psnr, base["psnr_db"]),
        "reidentification": reid,
        "psnr_db": psnr,
        "worst_attack": worst_attack,
        "attacks": attacks,
        "baseline_mean_image": base,
        "gradient_cosine": cosines,
    }
    if scenario.chance_control:
        result["chance"] = _chance(seen, setting, config, span)
    return result


def _chance(
    seen: list[tuple[Observation, Truth]], setting: Setting, config: AuditConfig, span: float
) -> dict[str, float]:
    """The attacks' worst figures when seeded Gaussian vectors (no client data at all) replace the observed
    payloads, highest over CHANCE_DRAWS draws (each with its own attack start): what they reach on these
    victims by chance, as the same worst-case statistic the setting reports."""
    best = {"reidentification": 0.0, "psnr_db": -math.inf}
    for draw in range(CHANCE_DRAWS):
        gen = torch.Generator().manual_seed(config.seed + draw)
        for obs, truth in seen:
            noise = torch.randn(obs.observed.shape, generator=gen) * obs.observed.std()
            blind = dataclasses.replace(obs, observed=noise, mask=torch.ones_like(obs.mask))
            for name, attack in ATTACKS.items():
                if name in NOT_APPLICABLE and NOT_APPLICABLE[name](blind) is not None:
                    continue
                recon = attack(blind, config.iterations, config.seed + draw)
                figures = metrics.score(recon, truth.victims, truth.victim_ids, setting.test_x, span)
                best = {k: max(best[k], figures[k]) for k in best}
    return {**best, "draws": CHANCE_DRAWS}


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
        settings=tuple(args.setting or AuditConfig.settings),
        trained_epochs=args.trained_epochs,
        local_epochs=args.local_epochs,
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
