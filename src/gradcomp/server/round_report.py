"""What a federated round reports: its round-log entry and the Prometheus metrics it moves.

Kept apart from the round state machine (`core`) so that what leaves the coordinator about a
round, into results.json, checkpoints and /metrics, is decided in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradcomp import metrics
from gradcomp.server.rounds import RoundState


def count_accepted(r: RoundState, nbytes: int, dense_bytes: int, clipped: bool) -> None:
    """An update joined round `r`: its bytes as sent and as a dense update would have cost."""
    r.uplink_bytes += nbytes
    r.dense_bytes += dense_bytes
    r.clipped += clipped
    metrics.FED_UPDATES_ACCEPTED.inc()
    metrics.FED_UPDATES_CLIPPED.inc(clipped)
    metrics.FED_UPLINK_BYTES.inc(nbytes)
    metrics.FED_UPLINK_DENSE_BYTES.inc(dense_bytes)
    metrics.FED_CLIENTS_REPORTED.set(len(r.received))


def round_entry(r: RoundState, agg_seconds: float, now: float, *, keep_claims: bool) -> dict[str, Any]:
    """The round-log entry of aggregated round `r`. `keep_claims` (`FedJob.reports_client_claims`):
    the example count and mean train loss the clients claimed go in; they are not noised, so under
    DP they stay out of the log and of everything written from it (results.json, the checkpoint,
    sweep cells) unless the job lets them out."""
    names = sorted(r.received)
    entry: dict[str, Any] = {
        "round": r.number,
        "clients": len(names),
        "selected": len(r.selected),
        "attempts": r.attempt + 1,
        "uplink_bytes": r.uplink_bytes,
        "dense_bytes": r.dense_bytes,
        "rejected": dict(r.rejected),
        "clipped": r.clipped,
        "aggregate_seconds": round(agg_seconds, 6),
        "round_seconds": round(now - r.started_at, 3),
    }
    if not keep_claims:
        return entry
    entry["examples"] = sum(r.received[n][0] for n in names)
    losses = [m["train_loss"] for m in r.client_metrics.values() if "train_loss" in m]
    if losses:
        entry["train_loss"] = sum(losses) / len(losses)
    return entry


def add_evaluation(entry: dict[str, Any], ev: Mapping[str, float]) -> None:
    """The global model's test metrics, into the entry (as test_*) and the gauges."""
    entry.update({f"test_{k}": float(v) for k, v in ev.items()})
    if "loss" in ev:
        metrics.FED_TEST_LOSS.set(ev["loss"])
    if "accuracy" in ev:
        metrics.FED_TEST_ACCURACY.set(ev["accuracy"])


def round_closed(r: RoundState, version: int, now: float, agg_seconds: float) -> None:
    metrics.FED_AGGREGATE_SECONDS.observe(agg_seconds)
    metrics.FED_ROUND.set(version)
    metrics.FED_ROUNDS_COMPLETED.inc()
    metrics.FED_ROUND_SECONDS.observe(now - r.started_at)
    metrics.FED_CLIENTS_SELECTED.set(0)
