"""Helpers shared by the benchmarks: interleaved timing against a baseline, JSON output, tables."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratio_to_baseline(
    fn: Callable[[], object], baseline: Callable[[], object], repeats: int = 7
) -> tuple[float, float, float]:
    """(median seconds of fn, median seconds of baseline, ratio), measured alternately.

    Alternating the two in one loop exposes both to the same machine load, so the ratio
    holds up on a busy machine where absolute times do not.
    """
    fn()
    baseline()
    ours, base = [], []
    for _ in range(repeats):
        base.append(timed(baseline))
        ours.append(timed(fn))
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    return m_ours, m_base, m_ours / m_base


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
