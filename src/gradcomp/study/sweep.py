"""`gradcomp sweep SWEEP.yaml`: run every cell of a grid, resumably, then write results.csv,
report.md and the plots under `<runs-dir>/<sweep name>/`.

Every cell's job is checked (as its runner's `--check` would) before the first cell
runs, so a typo in the grid fails in seconds rather than hours in. Finished cells are
skipped when the same command is run again; a cell that failed is reported and retried
on the next run.
"""

from __future__ import annotations

import argparse
import shlex
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gradcomp.config.common import ConfigError, load_job
from gradcomp.config.sweep import SweepJob
from gradcomp.results import atomic_write_json, human_bytes
from gradcomp.study import plots
from gradcomp.study.analysis import curve, summarize
from gradcomp.study.cells import Cell, CellStore, expand, load_base
from gradcomp.study.leakage import leakage_by_cell
from gradcomp.study.report import Row, write_csv, write_report
from gradcomp.study.runners import RUNNERS

if TYPE_CHECKING:
    from rich.console import Console


def cell_source(cell: Cell) -> str:
    """How errors name a cell's job."""
    return f"cell {cell.cell_id}"


def check_cells(sweep: SweepJob, cells: list[Cell]) -> None:
    """Validate every cell's job as its runner would (train also loads the task); one error lists every bad cell."""
    runner = RUNNERS[sweep.runner]
    problems = []
    for cell in cells:
        source = cell_source(cell)
        try:
            runner.check(cell.job, source)
        except ValueError as err:
            problems.append(str(err) if str(err).startswith(source) else f"{source}: {err}")
    if problems:
        raise ConfigError(f"sweep {sweep.name!r}: {len(problems)} cell(s) are not valid jobs:\n" + "\n".join(problems))


def _row(store: CellStore, cell: Cell, sweep: SweepJob, status: str | None = None) -> Row:
    results = store.load_results(cell)
    failed = store.cell_dir(cell) / "failed.json"
    if status is None:
        status = "done" if results is not None else ("failed" if failed.is_file() else "pending")
    summary = summarize(results, sweep.target_accuracy) if results is not None else None
    return Row(cell.cell_id, cell.spec.name, cell.full_spec, cell.privacy.name, cell.seed, cell.grid, status, summary)


def _baseline_setting(sweep: SweepJob, rows: list[Row]) -> str | None:
    name = sweep.baseline_name
    public = [p.name for p in sweep.privacy if not p.private]
    if name is None or not public:
        return None
    return next((r.setting for r in rows if r.spec_name == name and r.privacy == public[0]), None)


def write_outputs(
    sweep: SweepJob,
    store: CellStore,
    cells: list[Cell],
    command: str,
    with_plots: bool = True,
    leakage: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """results.csv, the three plots and report.md from whatever cells have finished (plots are the slow
    part, so progress updates between cells skip them); `leakage` (cell id -> audit figures) adds that column."""
    rows = [_row(store, c, sweep) for c in cells]
    for row in rows:
        row.leakage = (leakage or {}).get(row.cell)
    baseline = _baseline_setting(sweep, rows)
    groups: dict[str, plots.Group] = {}
    for cell, row in zip(cells, rows, strict=True):
        results = store.load_results(cell)
        if results is None:
            continue
        g = groups.setdefault(row.setting, plots.Group(row.setting, [], row.setting == baseline, cell.privacy.private))
        g.curves.append(curve(results))
    group_list = list(groups.values())
    out = store.root
    step = "round" if sweep.runner == "fedsim" else "epoch"
    target = sweep.target_accuracy
    paths = {"csv": write_csv(rows, out / "results.csv", target)}
    names = {
        "bytes": "accuracy_vs_bytes.png",
        "epsilon": "accuracy_vs_epsilon.png",
        "rounds": f"accuracy_over_{step}s.png",
    }
    if with_plots:
        paths["bytes"] = plots.accuracy_vs_bytes(group_list, out / names["bytes"], target)
        paths["epsilon"] = plots.accuracy_vs_epsilon(group_list, out / names["epsilon"], target)
        paths["rounds"] = plots.accuracy_over_rounds(group_list, out / names["rounds"], target, step)
    notes = []
    failed = [r.cell for r in rows if r.status == "failed"]
    if failed:
        notes.append(f"failed cells (see cells/<id>/failed.json; rerun the command to retry): {', '.join(failed)}")
    paths["report"] = write_report(
        out / "report.md",
        title=sweep.name,
        command=command,
        rows=rows,
        target=target,
        baseline_setting=baseline,
        plots=[out / names[k] for k in ("bytes", "epsilon", "rounds") if (out / names[k]).is_file()],
        notes=notes,
        step_name=step,
    )
    return paths


def _ensure_ray(sweep: SweepJob, cells: list[Cell], address: str | None) -> bool:
    """Start (or join) Ray once for all cells instead of once per cell; True when we started it.
    Not needed when every cell trains its clients in the driver (simulation.actors: 0)."""
    if sweep.runner != "fedsim":
        return False
    if all((c.job.get("simulation") or {}).get("actors") == 0 for c in cells):
        return False
    from gradcomp.raycluster import connect

    return connect(address)


def run_sweep(args: argparse.Namespace) -> int:
    """CLI handler of `gradcomp sweep`: check every cell, run those not finished, write the outputs."""
    from rich.console import Console

    overrides = list(getattr(args, "overrides", None) or [])
    sweep = load_job(SweepJob, args.sweep, overrides)
    cells = expand(sweep, load_base(sweep, args.sweep))
    check_cells(sweep, cells)
    console = Console(stderr=False)
    if args.check:
        console.print(f"sweep {sweep.name!r}: {len(cells)} cells ({sweep.runner}), all valid")
        return 0
    store = CellStore(Path(args.runs_dir) / sweep.name)
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    sets = [f"--set {shlex.quote(o)}" for o in overrides]
    command = " ".join(
        ["gradcomp sweep", shlex.quote(str(args.sweep)), *sets, "--runs-dir", shlex.quote(str(args.runs_dir))]
    )
    failures = run_cells(sweep, cells, store, command, args.address, console)
    leakage = None
    if sweep.leakage is not None:
        console.print(f"auditing leakage of {len({c.full_spec for c in cells})} distinct spec(s) (gradcomp audit)")
        leakage = leakage_by_cell(cells, sweep.leakage, store.root)
    paths = write_outputs(sweep, store, cells, command, leakage=leakage)
    console.print(f"wrote {paths['csv']}, {paths['report']} and plots in {store.root}")
    console.print(_tail_table(paths["report"]))
    return 1 if failures else 0


def run_cells(
    sweep: SweepJob, cells: list[Cell], store: CellStore, command: str, address: str | None, console: Console
) -> int:
    """Run every cell not finished yet (one bad cell does not stop the others); returns how many failed.

    results.csv and report.md are rewritten after each cell, so a long sweep can be read while it runs.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = [c for c in cells if not store.is_done(c)]
    stale = [c.cell_id for c in todo if store.is_stale(c)]
    if stale:
        console.print(f"[yellow]{len(stale)} finished cell(s) ran a different job and will run again:[/yellow] {stale}")
    console.print(
        f"sweep {sweep.name!r}: {len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run "
        f"-> {store.root}"
    )
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started_ray = _ensure_ray(sweep, todo, address) if todo else False
    failures = 0
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("cells", total=len(cells), completed=len(cells) - len(todo))
            for cell in todo:
                progress.update(bar, description=f"cell {cell.cell_id}")
                failures += not _run_cell(sweep, cell, store, address, progress.console)
                progress.advance(bar)
                write_outputs(sweep, store, cells, command, with_plots=False)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return failures


def _run_cell(sweep: SweepJob, cell: Cell, store: CellStore, address: str | None, console: Console) -> bool:
    """Run one cell from a clean directory; a failure is kept in failed.json (retried next time)."""
    t0 = time.time()
    store.prepare(cell)
    try:
        RUNNERS[sweep.runner].run(cell.job, cell_source(cell), store.runs_dir(cell), address)
        store.mark_done(cell)
    except Exception as err:  # one bad cell must not lose the others
        atomic_write_json(
            store.cell_dir(cell) / "failed.json", {"error": repr(err), "traceback": traceback.format_exc()}
        )
        console.print(f"[red]cell {cell.cell_id} failed:[/red] {err}")
        return False
    s = _row(store, cell, sweep).summary
    acc = f"{s.final_accuracy:.4f}" if s and s.final_accuracy is not None else "-"
    eps = f", eps {s.epsilon:.2f}" if s and s.epsilon is not None else ""
    sent = human_bytes(s.uplink_bytes) if s else "-"
    console.print(f"cell {cell.cell_id}: accuracy {acc}, uplink {sent}{eps} ({time.time() - t0:.0f} s)")
    return True


def _tail_table(report: Path) -> str:
    lines = report.read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("|"))


def load_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a finished sweep's results.csv (for notebooks and tests)."""
    import csv

    with open(Path(sweep_dir) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


__all__ = ["check_cells", "load_rows", "run_cells", "run_sweep", "write_outputs"]
