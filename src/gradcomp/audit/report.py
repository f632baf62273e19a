"""The audit's outputs: the JSON file, the terminal table and the PNG grid of victims beside
their reconstructions (one row per spec, attack and batch size)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from gradcomp.audit.config import SpecAudit
from gradcomp.audit.metrics import LEAK_PSNR_GAIN_DB, LEAK_REIDENTIFICATION
from gradcomp.audit.observe import as_images
from gradcomp.results import atomic_write_json

COLUMNS = [
    "spec",
    "verdict",
    "re-id (worst)",
    "PSNR dB (worst)",
    "worst attack",
    "worst setting",
    "re-id / PSNR dB per setting",
    "mean-image PSNR dB",
    "tokens P / R (base rate)",
    "cos(sent, true) per batch size",
    "epsilon (1 payload)",
]


def write_json(path: Path, entries: list[dict[str, Any]]) -> Path:
    """One entry per spec, strict JSON (an infinite epsilon is null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, entries)
    return path


def table_rows(entries: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, one row per spec (also used by the sweep's report)."""
    rows = []
    for e in entries:
        cos = " / ".join(f"{c:.3f}" for c in e["gradient_cosine"].values())
        dp = e.get("dp")
        eps = "-" if dp is None else ("inf" if not math.isfinite(dp["epsilon"]) else f"{dp['epsilon']:.3g}")
        tokens = e.get("token_recovery")
        rows.append(
            [
                e["spec"],
                e["verdict"],
                _num(e["reidentification"], ".2f"),
                _num(e["psnr_db"], ".1f"),
                e["worst_attack"] or "-",
                e.get("worst_setting") or "-",
                _per_setting(e.get("settings")),
                _num((e.get("baseline_mean_image") or {}).get("psnr_db"), ".1f"),
                _tokens(tokens),
                cos,
                eps,
            ]
        )
    return rows


def _per_setting(settings: dict[str, Any] | None) -> str:
    """Each setting's worst re-identification / PSNR, e.g. 'init 0.50/9.8, trained 0.88/13.6'."""
    if not settings:
        return "-"
    return ", ".join(
        f"{name} {s['reidentification']:.2f}/{s['psnr_db']:.1f}{_chance(s)}" for name, s in settings.items()
    )


def _chance(setting: dict[str, Any]) -> str:
    chance = setting.get("chance")
    return "" if chance is None else f" (chance {chance['reidentification']:.2f}/{chance['psnr_db']:.1f})"


def _tokens(recovery: dict[str, Any] | None) -> str:
    if recovery is None:
        return "-"
    return f"{recovery['precision']:.2f} / {recovery['recall']:.2f} ({recovery['base_rate']:.2f})"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(entries: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gradcomp audit: gradient inversion against each spec's payloads")
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for row in table_rows(entries):
        table.add_row(*row, style="red" if row[1] == "leaks" else "green")
    console = Console()
    console.width = max(console.width, 150)  # a wide table stays readable when piped
    console.print(table)
    print(
        f"leaks: some attack re-identifies > {LEAK_REIDENTIFICATION:.0%} of victims or beats the mean image "
        f"by >= {LEAK_PSNR_GAIN_DB:g} dB PSNR. The audit bounds leakage from below (what these attacks "
        "achieve); resisting them is not a proof of privacy. Token tasks are not judged: tokens P / R is the "
        "precision / recall of the batch's token set read off the embedding gradient's rows, at the batch "
        "size where precision most exceeds its base rate (the share of the vocabulary a batch holds). Settings: "
        "init = one gradient at initialisation, trained = one gradient on the trained model, federated = a "
        "client's multi-step local - global update; the verdict is the worst setting's."
    )


def _show(ax: plt.Axes, image: torch.Tensor, bounds: tuple[float, float]) -> None:
    """One input as an image (or as a one-row strip when it is not an image), on the data's range."""
    view = as_images(image, tuple(image.shape))
    shown = view[0] if view is not None else image.reshape(1, -1)
    ax.imshow(shown.numpy(), cmap="gray", vmin=bounds[0], vmax=bounds[1])
    ax.set_xticks([])
    ax.set_yticks([])


def write_grid(path: Path, audits: Sequence[SpecAudit]) -> Path:
    """Victims on the first row; below, each spec x attack x batch size's matched reconstructions."""
    rows: list[tuple[str, torch.Tensor]] = []
    for audit in audits:
        for (attack, batch), images in audit.images.items():
            rows.append((f"{audit.entry['spec']}\n{attack}, B={batch}", images))
    victims = audits[0].victims
    bounds = (float(victims.min()), float(victims.max()))
    cols = len(victims)
    fig, axes = plt.subplots(len(rows) + 1, cols, figsize=(1.0 * cols + 2.6, 1.0 * (len(rows) + 1)), squeeze=False)
    for j in range(cols):
        _show(axes[0][j], victims[j], bounds)
    axes[0][0].set_ylabel("victims", rotation=0, ha="right", va="center", fontsize=7)
    for i, (label, images) in enumerate(rows, start=1):
        for j in range(cols):
            if j < len(images):
                _show(axes[i][j], images[j], bounds)
            else:
                axes[i][j].axis("off")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
