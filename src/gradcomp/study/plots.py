"""The sweep's PNG plots (matplotlib, Agg backend: no display needed).

Each plot draws one line per setting (spec x privacy x grid values, averaged over seeds)
and the dense, non-private baseline as a thick black dashed line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gradcomp.study.analysis import Curve

BASELINE_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 2.5, "zorder": 5}


@dataclass
class Group:
    """All seeds of one setting."""

    label: str
    curves: list[Curve]
    baseline: bool
    private: bool

    def mean_curve(self) -> Curve:
        """Seed average, step by step, over the length all seeds share."""
        n = min(len(c.steps) for c in self.curves)
        k = len(self.curves)
        eps = []
        for i in range(n):
            vals = [e for e in (c.epsilon[i] for c in self.curves) if e is not None]
            eps.append(sum(vals) / len(vals) if vals else None)
        return Curve(
            steps=self.curves[0].steps[:n],
            accuracy=[sum(c.accuracy[i] for c in self.curves) / k for i in range(n)],
            cum_bytes=[round(sum(c.cum_bytes[i] for c in self.curves) / k) for i in range(n)],
            epsilon=eps,
        )


def _style(group: Group) -> dict:
    if group.baseline:
        return dict(BASELINE_STYLE)
    return {"linestyle": ":" if group.private else "-", "linewidth": 1.4}


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path, title: str, target: float | None) -> Path:
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, alpha=0.7)
        ax.text(ax.get_xlim()[0], target, f" target {target:g}", va="bottom", fontsize=7, color="grey")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def _usable(groups: list[Group]) -> list[Group]:
    return [g for g in groups if g.curves and min(len(c.steps) for c in g.curves) > 0]


def accuracy_vs_bytes(groups: list[Group], path: Path, target: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in _usable(groups):
        c = g.mean_curve()
        xs = [max(b, 1) for b in c.cum_bytes]
        ax.plot(xs, c.accuracy, label=g.label + (" (baseline)" if g.baseline else ""), **_style(g))
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes (log scale)")
    return _finish(fig, ax, path, "Accuracy vs uplink bytes", target)


def accuracy_over_rounds(
    groups: list[Group], path: Path, target: float | None = None, step_name: str = "round"
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in _usable(groups):
        c = g.mean_curve()
        ax.plot(c.steps, c.accuracy, label=g.label + (" (baseline)" if g.baseline else ""), **_style(g))
    ax.set_xlabel(step_name)
    return _finish(fig, ax, path, f"Accuracy over {step_name}s per setting", target)


def accuracy_vs_epsilon(groups: list[Group], path: Path, target: float | None = None) -> Path:
    """Private settings trace accuracy against epsilon spent; the baseline is its best accuracy (eps = inf)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drew = False
    for g in _usable(groups):
        c = g.mean_curve()
        if g.baseline:
            ax.axhline(max(c.accuracy), label=f"{g.label} (baseline, no DP)", **BASELINE_STYLE)
            continue
        pts = [(e, a) for e, a in zip(c.epsilon, c.accuracy, strict=True) if e is not None and e > 0]
        if g.private and pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=g.label, linewidth=1.4)
            drew = True
    if drew:
        ax.set_xlabel("epsilon spent")
    else:
        ax.set_xlabel("epsilon")
        ax.text(0.5, 0.5, "no private settings with an epsilon in this sweep", transform=ax.transAxes, ha="center")
    return _finish(fig, ax, path, "Accuracy vs privacy budget (epsilon)", target)
