"""The `runs/<name>/results.json` contract shared by every entry point, and its terminal summary.

Layout of results.json (keys other parts rely on):
  name, kind ("train" | "fed" | "fedsim" | "sweep"), config (the validated job),
  final (last metrics), history (one dict per epoch or round), bytes_sent,
  dense_bytes (what the same run would send uncompressed), epsilon and delta
  (null without DP; epsilon is also null for DP without noise, whose epsilon is infinite),
  wall_seconds, started_at, finished_at, gradcomp_version, task (the task's own description:
  for lm the corpus digest and split, for every task what it says of its data and model).
  Strict JSON: no NaN or Infinity.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradcomp import __version__


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file + rename, so readers and crash recovery never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(obj: Any, indent: int | None = None) -> str:
    """JSON that jq and browsers parse: a non-finite float (the loss of a diverged run, the
    infinite epsilon of DP without noise) is written as null, never as NaN or Infinity."""
    return json.dumps(_finite(obj), indent=indent, default=_jsonable, allow_nan=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, strict_json(obj, indent=2).encode())


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return _finite(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunRecord:
    """Accumulates one run's history and writes results.json after every update.

    Writing after each epoch/round means a crashed run still leaves its history behind.
    """

    def __init__(self, run_dir: str | Path, name: str, kind: str, config: Mapping[str, Any]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "results.json"
        self.started = time.time()
        self.data: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "config": dict(config),
            "final": {},
            "history": [],
            "bytes_sent": 0,
            "dense_bytes": 0,
            "epsilon": None,
            "delta": None,
            "wall_seconds": 0.0,
            "started_at": _iso(self.started),
            "finished_at": None,
            "gradcomp_version": __version__,
            "task": {},
        }

    @classmethod
    def resume(cls, run_dir: str | Path, name: str, kind: str, config: Mapping[str, Any]) -> RunRecord:
        """Continue a record from an earlier (crashed or finished) run in the same directory."""
        rec = cls(run_dir, name, kind, config)
        if rec.path.is_file():
            old = json.loads(rec.path.read_text())
            rec.replace_history(
                old.get("history", []), bytes_sent=old.get("bytes_sent", 0), dense_bytes=old.get("dense_bytes", 0)
            )
            rec.started -= float(old.get("wall_seconds", 0.0))
        return rec

    @property
    def history(self) -> list[dict[str, Any]]:
        """The entries logged so far (a copy: change them through the methods)."""
        return [dict(e) for e in self.data["history"]]

    @property
    def final(self) -> dict[str, Any]:
        return dict(self.data["final"])

    def replace_history(self, entries: Sequence[Mapping[str, Any]], *, bytes_sent: int, dense_bytes: int) -> None:
        """Set the whole history and byte totals at once, e.g. from a checkpoint or after dropping
        entries a restarted run replays; `final` becomes the last entry. Not saved until the next write."""
        self.data["history"] = [dict(e) for e in entries]
        self.data["bytes_sent"] = int(bytes_sent)
        self.data["dense_bytes"] = int(dense_bytes)
        self.data["final"] = dict(entries[-1]) if entries else {}

    def alias_metric(self, name: str, alias: str) -> None:
        """Also store `name` under `alias` in every history entry that has it (one name across run kinds)."""
        for entry in self.data["history"]:
            if name in entry:
                entry[alias] = entry[name]

    def log(self, entry: Mapping[str, Any], *, bytes_sent: int = 0, dense_bytes: int = 0) -> None:
        """Append one epoch/round entry, add its bytes, and persist."""
        self.data["history"].append(dict(entry))
        self.data["bytes_sent"] += int(bytes_sent)
        self.data["dense_bytes"] += int(dense_bytes)
        self.data["final"] = dict(entry)
        self.save()

    def set_task(self, info: Mapping[str, Any]) -> None:
        """What the task says about its data and model (a corpus digest, sizes): two runs with the
        same digest trained on the same text. Saved with the next write."""
        self.data["task"] = dict(info)

    def set_privacy(self, epsilon: float | None, delta: float | None) -> None:
        """The run's privacy guarantee so far (null without DP); saved with the next write."""
        self.data["epsilon"] = epsilon
        self.data["delta"] = delta

    def finish(self, **final: Any) -> dict[str, Any]:
        """Add `final` to the last metrics, stamp the finish time, save; returns the results dict."""
        self.data["final"].update(final)
        self.data["finished_at"] = _iso(time.time())
        self.save()
        return self.data

    def save(self) -> None:
        self.data["wall_seconds"] = round(time.time() - self.started, 3)
        atomic_write_json(self.path, self.data)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_summary(results: Mapping[str, Any]) -> None:
    """A short human table of a finished run on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gradcomp {results['kind']}: {results['name']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for key, value in results.get("final", {}).items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    sent, dense = results.get("bytes_sent", 0), results.get("dense_bytes", 0)
    table.add_row("bytes sent", human_bytes(sent))
    if dense:
        table.add_row("dense-equivalent bytes", human_bytes(dense))
        table.add_row("compression", f"{dense / max(sent, 1):.1f}x")
    if results.get("epsilon") is not None:
        table.add_row("epsilon", f"{results['epsilon']:.3f} (delta={results['delta']:g})")
    table.add_row("wall seconds", f"{results.get('wall_seconds', 0.0):.1f}")
    Console().print(table)
