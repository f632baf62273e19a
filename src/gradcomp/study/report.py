"""results.csv (one row per cell) and report.md (one row per setting, seeds aggregated)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcomp.results import atomic_write_bytes, human_bytes
from gradcomp.study.analysis import CellSummary, mean_std

CSV_COLUMNS = [
    "cell",
    "spec_name",
    "spec",
    "privacy",
    "seed",
    "grid",
    "status",
    "final_accuracy",
    "best_accuracy",
    "rounds",
    "uplink_bytes",
    "dense_bytes",
    "compression",
    "epsilon",
    "delta",
    "target_accuracy",
    "rounds_to_target",
    "bytes_to_target",
    "wall_seconds",
    "leakage",
    "leak_reidentification",
    "leak_psnr_db",
]


LEAKAGE_NOTE = (
    "'leakage' is `gradcomp audit` on the spec each cell's clients (or workers) send: gradient-inversion "
    "attacks on the payload, worst case over attacks and batch sizes (`leaks` when more than 20% of victims "
    "are re-identified or PSNR beats the mean image by 6 dB). A central-DP setting is audited without the "
    "coordinator's noise, since the coordinator sees the updates before adding it. Resisting the audit "
    "bounds leakage from below against these attacks; it is not a proof of privacy."
)


@dataclass
class Row:
    cell: str
    spec_name: str
    spec: str
    privacy: str
    seed: int
    grid: dict[str, Any]
    status: str
    summary: CellSummary | None = None
    leakage: dict[str, Any] | None = None  # the spec's audit figures (study/leakage.py), when asked for

    @property
    def setting(self) -> str:
        extra = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.grid.items())
        return f"{self.spec_name} / {self.privacy}" + (f" [{extra}]" if extra else "")

    def csv_row(self, target: float | None) -> dict[str, Any]:
        s = self.summary
        row: dict[str, Any] = {
            "cell": self.cell,
            "spec_name": self.spec_name,
            "spec": self.spec,
            "privacy": self.privacy,
            "seed": self.seed,
            "grid": ";".join(f"{k}={v}" for k, v in self.grid.items()),
            "status": self.status,
            "target_accuracy": target if target is not None else "",
        }
        if self.leakage is not None:
            row.update(
                leakage=self.leakage["verdict"],
                leak_reidentification=_num(self.leakage["reidentification"], 3),
                leak_psnr_db=_num(self.leakage["psnr_db"], 1),
            )
        if s is not None:
            row.update(
                final_accuracy=_num(s.final_accuracy),
                best_accuracy=_num(s.best_accuracy),
                rounds=s.steps,
                uplink_bytes=s.uplink_bytes,
                dense_bytes=s.dense_bytes,
                compression=_num(s.dense_bytes / s.uplink_bytes if s.uplink_bytes and s.dense_bytes else None, 2),
                epsilon=_num(s.epsilon),
                delta=s.delta if s.delta is not None else "",
                rounds_to_target=s.steps_to_target if s.steps_to_target is not None else "",
                bytes_to_target=s.bytes_to_target if s.bytes_to_target is not None else "",
                wall_seconds=_num(s.wall_seconds, 1),
            )
        return row


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_csv(rows: Sequence[Row], path: Path, target: float | None) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.csv_row(target))
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


@dataclass
class SettingStats:
    setting: str
    spec: str
    rows: list[Row] = field(default_factory=list)

    def done(self) -> list[CellSummary]:
        return [r.summary for r in self.rows if r.summary is not None]


def settings(rows: Sequence[Row]) -> list[SettingStats]:
    out: dict[str, SettingStats] = {}
    for r in rows:
        out.setdefault(r.setting, SettingStats(r.setting, r.spec)).rows.append(r)
    return list(out.values())


def _code(spec: str) -> str:
    """A spec in a Markdown table cell: '|' would end the cell, so it is escaped."""
    return "`" + spec.replace("|", "\\|") + "`"


def _fmt_acc(values: list[float | None]) -> str:
    m, s = mean_std(values)
    if m is None:
        return "-"
    return f"{m:.4f}" + (f" ± {s:.4f}" if s else "")


def settings_table(
    rows: Sequence[Row], target: float | None, baseline_setting: str | None, step_name: str = "round"
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-setting Markdown table (also used for docs/benchmarks.md).

    `step_name` is what a history entry counts: rounds (federated) or epochs (data-parallel).
    """
    stats = settings(rows)
    base_bytes = _baseline_bytes(stats, target, baseline_setting)
    table = [_setting_row(st, target, baseline_setting, base_bytes) for st in stats]
    header = _header(target, step_name)
    if any(r.leakage is not None for r in rows):
        header.append("leakage (audit)")
        for st, line in zip(stats, table, strict=True):
            line.append(_leak_cell(st.rows[0].leakage))
    return header, table


def _leak_cell(leakage: dict[str, Any] | None) -> str:
    if leakage is None:
        return "-"
    tokens = leakage.get("token_recovery")
    if leakage.get("reidentification") is None and tokens:  # a token task: not judged, its attack's figures
        return (f"{leakage['verdict']} (tokens P {tokens['precision']:.2f} / R {tokens['recall']:.2f}, "
                f"base rate {tokens['base_rate']:.2f})")  # fmt: skip
    if leakage.get("reidentification") is None:
        return str(leakage["verdict"])
    return f"{leakage['verdict']} (re-id {leakage['reidentification']:.2f}, {leakage['psnr_db']:.0f} dB)"


def _header(target: float | None, step_name: str) -> list[str]:
    tgt = f"{target:g}" if target is not None else "target"
    return [
        "setting",
        "spec",
        "seeds",
        "final acc",
        "best acc",
        f"{step_name}s to {tgt}",
        f"uplink bytes to {tgt}",
        f"bytes saved vs baseline at {tgt}",
        "total uplink",
        "compression",
        "epsilon",
    ]


def _baseline_bytes(stats: list[SettingStats], target: float | None, baseline_setting: str | None) -> float | None:
    """The baseline's mean uplink bytes to the target, when every one of its seeds reached it."""
    if baseline_setting is None or target is None:
        return None
    base = next((s for s in stats if s.setting == baseline_setting), None)
    bytes_to_target = [d.bytes_to_target for d in base.done()] if base else []
    reached = [b for b in bytes_to_target if b is not None]
    if reached and len(reached) == len(bytes_to_target):
        return sum(reached) / len(reached)
    return None


def _to_target(done: list[CellSummary], target: float | None, base_bytes: float | None) -> tuple[str, str, str]:
    """Steps to the target, bytes to the target and bytes saved against the baseline, seeds averaged."""
    reached = [d for d in done if d.steps_to_target is not None]
    if target is None:
        return "-", "-", "-"
    if len(reached) < len(done):
        return f"not reached ({len(reached)}/{len(done)} seeds)", "-", "-"
    mean_r = sum(d.steps_to_target or 0 for d in reached) / len(reached)  # all reached: none is None
    mean_b = sum(d.bytes_to_target or 0 for d in reached) / len(reached)
    steps = f"{mean_r:.1f}" if len(reached) > 1 else f"{mean_r:.0f}"
    saved = f"{base_bytes / mean_b:.1f}x" if base_bytes and mean_b else "-"
    return steps, human_bytes(mean_b), saved


def _setting_row(
    st: SettingStats, target: float | None, baseline_setting: str | None, base_bytes: float | None
) -> list[str]:
    done, n = st.done(), len(st.rows)
    if not done:
        return [st.setting, _code(st.spec), f"0/{n}", *["-"] * 8]
    up = sum(d.uplink_bytes for d in done) / len(done)
    dense = sum(d.dense_bytes for d in done) / len(done)
    eps = [d.epsilon for d in done if d.epsilon is not None]
    return [
        st.setting + (" **(baseline)**" if st.setting == baseline_setting else ""),
        _code(st.spec),
        f"{len(done)}/{n}",
        _fmt_acc([d.final_accuracy for d in done]),
        _fmt_acc([d.best_accuracy for d in done]),
        *_to_target(done, target, base_bytes),
        human_bytes(up),
        f"{dense / up:.1f}x" if up and dense else "-",
        f"{sum(eps) / len(eps):.2f}" if eps else "-",
    ]


def markdown_table(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    return "\n".join(lines)


def write_report(
    path: Path,
    *,
    title: str,
    command: str,
    rows: Sequence[Row],
    target: float | None,
    baseline_setting: str | None,
    plots: Sequence[Path],
    notes: Sequence[str] = (),
    step_name: str = "round",
) -> Path:
    header, table = settings_table(rows, target, baseline_setting, step_name)
    done = sum(1 for r in rows if r.summary is not None)
    parts = [
        f"# Sweep report: {title}",
        "",
        f"Command: `{command}`  ",
        f"Cells finished: {done}/{len(rows)}.  ",
        f"Baseline (dense, non-private): {baseline_setting or 'none in this sweep'}.",
        "",
        "Accuracy is test accuracy (mean ± std over seeds). 'bytes saved' is the baseline's uplink bytes to the "
        "target divided by this setting's. 'compression' is dense-equivalent bytes / bytes actually sent.",
        "",
        markdown_table(header, table),
        "",
    ]
    if any(r.leakage is not None for r in rows):
        parts += [LEAKAGE_NOTE, ""]
    parts += [f"- {n}" for n in notes]
    parts += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
