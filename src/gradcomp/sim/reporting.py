"""What an in-process simulation writes while it runs: one results.json row per round (with
running totals the coordinator does not see: dropouts, late updates, real message sizes), a
progress bar with a line every ~5% of the rounds, and the final summary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gradcomp.config.fed import FedJob
from gradcomp.results import RunRecord, human_bytes
from gradcomp.sim.engine import RoundStats, Simulation
from gradcomp.sim.pool import peak_rss_bytes


class RoundReport:
    """Turns each finished round into a results row (and a terminal line when `show`)."""

    def __init__(self, job: FedJob, sim: Simulation, record: RunRecord, show: bool):
        self.job, self.sim, self.record, self.show = job, sim, record, show
        self.totals = {"uplink": 0, "sent": 0, "messages": 0, "downlink": 0, "dropped": 0, "late": 0}
        self.t0 = time.time()
        self._progress: Progress | None = None
        self._bar: TaskID | None = None

    @contextmanager
    def live(self) -> Iterator[RoundReport]:
        """The progress bar around the run (a no-op display when not `show`)."""
        columns = (TextColumn("[bold]fedsim {task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=Console(), disable=not self.show) as progress:
            self._progress, self._bar = progress, progress.add_task(self.job.name, total=self.job.rounds)
            yield self

    def on_round(self, entry: dict[str, Any], stats: RoundStats) -> None:
        t = self.totals
        t["uplink"] += entry["uplink_bytes"]
        t["sent"] += stats.payload_bytes_sent
        t["messages"] += stats.message_bytes_sent
        t["downlink"] += stats.downlink_bytes
        t["dropped"] += stats.dropped
        t["late"] += stats.late
        row = self._row(entry, stats)
        coord = self.sim.coord
        self.record.set_privacy(coord.epsilon, self.job.privacy.delta if coord.epsilon is not None else None)
        self.record.log(row, bytes_sent=entry["uplink_bytes"], dense_bytes=entry["dense_bytes"])
        if self.show:
            self._print(row, stats)

    def _row(self, entry: dict[str, Any], stats: RoundStats) -> dict[str, Any]:
        row = dict(entry)
        if "test_accuracy" in row:
            row["accuracy"] = row["test_accuracy"]
        row.update(
            uplink_bytes_total=self.totals["uplink"],
            uplink_sent_bytes=stats.payload_bytes_sent,
            uplink_message_bytes=stats.message_bytes_sent,
            downlink_bytes=stats.downlink_bytes,
            trained=stats.trained,
            dropped=stats.dropped,
            late=stats.late,
            virtual_seconds=round(self.sim.clock.now, 3),
            wall_seconds=round(time.time() - self.t0, 3),
        )
        return row

    def _print(self, row: dict[str, Any], stats: RoundStats) -> None:
        assert self._progress is not None and self._bar is not None
        number = row["round"]
        if number % max(1, self.job.rounds // 20) == 0 or number == self.job.rounds:
            acc = f" acc {row['accuracy']:.4f}" if "accuracy" in row else ""
            eps = f" eps {row['epsilon']:.2f}" if "epsilon" in row else ""
            extra = f" dropped {stats.dropped} late {stats.late}" if stats.dropped or stats.late else ""
            uplink = human_bytes(row["uplink_bytes"])
            line = f"round {number:>4}: {row['clients']} updates{acc}{eps} uplink {uplink}{extra}"
            self._progress.console.print(line)
        self._progress.update(self._bar, completed=number)

    def final(self) -> dict[str, Any]:
        """The results' `final` section: status, counts, byte totals, memory, last evaluation."""
        sim, coord = self.sim, self.sim.coord
        actors_rss = sim.pool.peak_rss()
        out: dict[str, Any] = {
            "status": coord.status,
            "rounds": coord.version,
            "updates_trained": sim.updates_trained,
            "updates_accepted": coord.totals["accepted"],
            "updates_rejected": coord.totals["rejected"],
            "uplink_message_bytes_total": self.totals["messages"],
            "downlink_bytes_total": self.totals["downlink"],
            "dropped_total": self.totals["dropped"],
            "late_total": self.totals["late"],
            "actors": sim.pool.size if sim.sim.actors != 0 else 0,
            "vectorized": bool(getattr(sim.pool, "vectorized", False)),
            "training": "vectorised" if getattr(sim.pool, "vectorized", False) else "sequential",
            "sequential_reason": getattr(sim.pool, "fallback", None),
            "peak_rss_driver_bytes": peak_rss_bytes(),
            "peak_rss_actors_bytes": int(np.sum(actors_rss)) if actors_rss else 0,
            "client_state_bytes": sim.clients.nbytes(),
        }
        last_eval = next((e for e in reversed(coord.log) if "test_loss" in e), None)
        if last_eval is not None:  # the task's objective's metrics: accuracy, perplexity, ...
            out.update({k.removeprefix("test_"): v for k, v in last_eval.items() if k.startswith("test_")})
        self.record.set_privacy(coord.epsilon, self.job.privacy.delta if coord.epsilon is not None else None)
        return out
