"""Means with standard errors over seeds, and which differences from a reference they resolve.

A difference is computed per seed (the same seed gives both runs the same initialisation and data
order, so the pairs share most of their noise) and its standard error is that of the per-seed
differences; with one seed there is no standard error and nothing is called resolved.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None below two values)."""
    if not values:
        return math.nan, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def compare(per_seed: Mapping[str, Mapping[int, float]], reference: str) -> dict[str, dict[str, Any]]:
    """For each run: mean ± SE over its seeds, and its paired difference from `reference` ± SE,
    with `exceeds_2se` true when |difference| > 2 SE of the difference."""
    ref = per_seed.get(reference, {})
    out: dict[str, dict[str, Any]] = {}
    for name, values in per_seed.items():
        mean, se = mean_se(list(values.values()))
        row: dict[str, Any] = {"mean": mean, "se": se, "seeds": sorted(values)}
        common = sorted(set(values) & set(ref))
        if name != reference and common:
            diff, diff_se = mean_se([values[s] - ref[s] for s in common])
            row.update(diff=diff, diff_se=diff_se, exceeds_2se=diff_se is not None and abs(diff) > 2 * diff_se)
        out[name] = row
    return out


def fmt(mean: float, se: float | None, digits: int = 4) -> str:
    """`mean ± se` (no ± with a single seed)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def fmt_diff(row: Mapping[str, Any], digits: int = 4) -> str:
    """The difference column: `+d ± se` and a star when it exceeds 2 SE."""
    if "diff" not in row:
        return "(reference)" if "se" in row else "-"
    star = " *" if row.get("exceeds_2se") else ""
    se = f" ± {row['diff_se']:.{digits}f}" if row["diff_se"] is not None else ""
    return f"{row['diff']:+.{digits}f}{se}{star}"


def noise_note(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence: which differences are resolved, or that all are inside the noise."""
    resolved = [name for name, row in rows.items() if row.get("exceeds_2se")]
    compared = [name for name, row in rows.items() if "diff" in row]
    if not compared:
        return "No run was compared with the reference."
    if all(row.get("diff_se") is None for name, row in rows.items() if "diff" in row):
        return "One seed only: no standard error, so no difference can be called resolved."
    if not resolved:
        return (
            "Every difference from the reference is inside 2 standard errors: this table cannot tell these runs apart."
        )
    return f"Differences beyond 2 standard errors (*): {', '.join(resolved)}; every other one is inside the noise."
