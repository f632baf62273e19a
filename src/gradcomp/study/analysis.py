"""Turn a run's results.json into a curve (step, accuracy, cumulative uplink bytes, epsilon) and
the numbers a trade-off table needs: final/best accuracy, rounds and bytes to a target accuracy.

Reads the shared results.json contract only, so it works for federated (per-round) and
data-parallel (per-epoch) runs alike; a history entry may carry its own byte count
(`uplink_bytes` / `bytes_sent`) or a running total (`uplink_bytes_total` / `bytes_total`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACCURACY_KEYS = ("accuracy", "test_accuracy", "val_accuracy", "eval_accuracy")
STEP_KEYS = ("round", "epoch", "step")
TOTAL_BYTES_KEYS = ("uplink_bytes_total", "bytes_total", "bytes_sent_total")
STEP_BYTES_KEYS = ("uplink_bytes", "bytes_sent", "bytes")


@dataclass
class Curve:
    steps: list[int]
    accuracy: list[float]
    cum_bytes: list[int]
    epsilon: list[float | None]

    def reach(self, target: float) -> tuple[int | None, int | None]:
        """(step, cumulative bytes) when accuracy first reaches `target`, else (None, None)."""
        for step, acc, sent in zip(self.steps, self.accuracy, self.cum_bytes, strict=True):
            if acc >= target:
                return step, sent
        return None, None


def _first(entry: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((entry[k] for k in keys if entry.get(k) is not None), None)


def curve(results: Mapping[str, Any]) -> Curve:
    steps: list[int] = []
    acc: list[float] = []
    sent: list[int] = []
    eps: list[float | None] = []
    running = 0
    for i, entry in enumerate(results.get("history", [])):
        a = _first(entry, ACCURACY_KEYS)
        total = _first(entry, TOTAL_BYTES_KEYS)
        if total is None:
            running += int(_first(entry, STEP_BYTES_KEYS) or 0)
            total = running
        else:
            running = int(total)
        if a is None:
            continue
        step = _first(entry, STEP_KEYS)
        steps.append(int(step) if step is not None else i + 1)
        acc.append(float(a))
        sent.append(int(total))
        e = entry.get("epsilon")
        eps.append(float(e) if e is not None else None)
    if sent and sent[-1] == 0 and results.get("bytes_sent"):
        # Only a run total is known: spread it evenly (each round costs about the same).
        per = int(results["bytes_sent"]) / len(sent)
        sent = [round(per * (i + 1)) for i in range(len(sent))]
    return Curve(steps, acc, sent, eps)


@dataclass
class CellSummary:
    final_accuracy: float | None
    best_accuracy: float | None
    steps: int
    uplink_bytes: int
    dense_bytes: int
    epsilon: float | None
    delta: float | None
    steps_to_target: int | None
    bytes_to_target: int | None
    wall_seconds: float


def summarize(results: Mapping[str, Any], target: float | None) -> CellSummary:
    c = curve(results)
    final = results.get("final", {})
    final_acc = _first(final, ACCURACY_KEYS)
    if final_acc is None and c.accuracy:
        final_acc = c.accuracy[-1]
    reach = c.reach(target) if target is not None else (None, None)
    return CellSummary(
        final_accuracy=float(final_acc) if final_acc is not None else None,
        best_accuracy=max(c.accuracy) if c.accuracy else None,
        steps=c.steps[-1] if c.steps else 0,
        uplink_bytes=int(results.get("bytes_sent") or (c.cum_bytes[-1] if c.cum_bytes else 0)),
        dense_bytes=int(results.get("dense_bytes") or 0),
        epsilon=results.get("epsilon"),
        delta=results.get("delta"),
        steps_to_target=reach[0],
        bytes_to_target=reach[1],
        wall_seconds=float(results.get("wall_seconds") or 0.0),
    )


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
