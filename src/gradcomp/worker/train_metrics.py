"""Prometheus metrics of a `gradcomp train` run, kept on the driver.

The driver already receives every worker's per-step and per-epoch progress events through
a Ray queue (worker/loop.py -> worker/launch.py); `TrainMetrics.observe` turns those events
into the `gradcomp_train_*` metrics of gradcomp.metrics, and `gradcomp train --metrics-port`
serves them at /metrics. Doing it on the driver (rather than with `ray.util.metrics` in the
workers) keeps one scrape target per run whose address the user chose, needs nothing from
Ray's metrics agent, and keeps the names exactly as metrics.py defines them (Ray would
prefix them with `ray_`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gradcomp import metrics

Observer = Callable[[dict[str, Any]], None]

_PER_RANK = (
    metrics.TRAIN_STEPS,
    metrics.TRAIN_EXAMPLES,
    metrics.TRAIN_BYTES_SENT,
    metrics.TRAIN_DENSE_BYTES,
    metrics.TRAIN_STEP_SECONDS,
)


class TrainMetrics:
    """Feeds one run's progress events into the `gradcomp_train_*` metrics, labelled by run and rank."""

    def __init__(self, run: str, world: int, batch_size: int):
        self.run = run
        self.batch_size = batch_size
        # Every counter and histogram exists at 0 from the start, so rate() and the dashboard see them.
        for rank in range(world):
            for metric in _PER_RANK:
                metric.labels(run=run, rank=str(rank))
        metrics.TRAIN_RESTORES.labels(run=run)

    def observe(self, event: dict[str, Any]) -> None:
        """Take one event from the workers' queue ({"type": "step" | "epoch" | "restored" | ...})."""
        kind = event.get("type")
        if kind == "step":
            self._step(event)
        elif kind == "epoch":
            self._epoch(event)
        elif kind == "restored":
            metrics.TRAIN_RESTORES.labels(run=self.run).inc()

    def _step(self, e: dict[str, Any]) -> None:
        labels = {"run": self.run, "rank": str(e.get("rank", 0))}
        metrics.TRAIN_STEPS.labels(**labels).inc()
        # DP batches vary, and their drawn sizes stay in the workers: then the expected batch (= batch_size) counts
        metrics.TRAIN_EXAMPLES.labels(**labels).inc(e.get("examples", self.batch_size))
        metrics.TRAIN_BYTES_SENT.labels(**labels).inc(e["bytes_sent"])
        metrics.TRAIN_DENSE_BYTES.labels(**labels).inc(e["dense_bytes"])
        metrics.TRAIN_COMPRESSION_RATIO.labels(**labels).set(e["compression_ratio"])
        metrics.TRAIN_STEP_SECONDS.labels(**labels).observe(e["step_seconds"])
        if "loss" in e:  # DP leaves the un-noised loss out (see dp.unprotected_metrics)
            metrics.TRAIN_LOSS.labels(**labels).set(e["loss"])
        if "lr" in e:
            metrics.TRAIN_LEARNING_RATE.labels(run=self.run).set(e["lr"])

    def _epoch(self, e: dict[str, Any]) -> None:
        run = self.run
        metrics.TRAIN_EPOCH.labels(run=run).set(e["epoch"])
        if "test_accuracy" in e:
            metrics.TRAIN_TEST_ACCURACY.labels(run=run).set(e["test_accuracy"])
            metrics.TRAIN_TEST_LOSS.labels(run=run).set(e["test_loss"])
        if "epsilon" in e:  # DP on; None in results.json means infinite (no noise)
            eps = e["epsilon"]
            metrics.TRAIN_EPSILON.labels(run=run).set(math.inf if eps is None else eps)


@contextmanager
def exported(
    run: str, world: int, batch_size: int, port: int | None, host: str, linger: float
) -> Iterator[Observer | None]:
    """Serve the run's metrics at http://host:port/metrics while the block runs (nothing if port is None);
    yields the event observer to hand to the launcher. See `metrics.exposed` for `linger`."""
    with metrics.exposed(port, host, linger, who="gradcomp train") as bound:
        yield None if bound is None else TrainMetrics(run, world, batch_size).observe
