"""Pure functions on dense updates that strategies combine: norms, clipping, weighted means, sums.

No rounds, clients or gRPC here, so every rule is testable on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Params = dict[str, torch.Tensor]


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of an update taken together (the quantity DP clipping bounds)."""
    if not update:
        return 0.0
    return float(torch.linalg.vector_norm(torch.cat([v.reshape(-1).float() for v in update.values()])))


def clip_update(update: Mapping[str, torch.Tensor], clip: float) -> tuple[Params, float]:
    """Scale the whole update to L2 norm <= clip (one client's contribution); returns (update, old norm).

    An update already within the bound comes back as the same tensors (a new dict), not copies."""
    norm = global_norm(update)
    if norm <= clip:
        return dict(update), norm
    return {k: v * (clip / norm) for k, v in update.items()}, norm


def weighted_average(updates: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> Params:
    """FedAvg weighting: sum_i w_i * u_i / sum_i w_i (weights are example counts)."""
    if not updates:
        raise ValueError("cannot average zero updates")
    total = float(sum(w for w, _ in updates))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    keys = list(updates[0][1])
    out = {k: torch.zeros_like(updates[0][1][k], dtype=torch.float32) for k in keys}
    for w, u in updates:
        for k in keys:
            out[k].add_(u[k].float(), alpha=w / total)
    return out


def clipped_sum(updates: Sequence[Mapping[str, torch.Tensor]], clip: float) -> Params:
    """sum_i clip(u_i): one client moves it by at most `clip` in L2 (the sum's sensitivity)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    keys = list(updates[0])
    total = {k: torch.zeros_like(updates[0][k], dtype=torch.float32) for k in keys}
    for u in updates:
        clipped, _ = clip_update(u, clip)
        for k in keys:
            total[k].add_(clipped[k].float())
    return total


def capped_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Normalised weights with none above `max_share` (water-filling: the excess of a capped
    weight goes to the others in proportion to theirs). One client claiming a huge example
    count then moves the mean by at most `max_share` of the round. Uniform when the cap cannot
    be met (max_share * n <= 1)."""
    n = len(weights)
    total = float(sum(weights))
    if n == 0 or total <= 0:
        raise ValueError(f"weights must be non-empty and sum to a positive number, got {list(weights)}")
    if max_share * n <= 1:
        return [1.0 / n] * n
    capped: set[int] = set()
    shares = [w / total for w in weights]
    while over := [i for i in range(n) if i not in capped and shares[i] > max_share]:
        capped.update(over)
        free = 1.0 - max_share * len(capped)
        rest = sum(weights[i] for i in range(n) if i not in capped)
        shares = [max_share if i in capped else weights[i] * free / rest for i in range(n)]
    return shares


def stacked(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each tensor of the updates stacked along a new first dimension (one row per client)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    return {k: torch.stack([u[k].float() for u in updates]) for k in updates[0]}


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> Params:
    """Coordinate-wise median (Yin et al. 2018); with an even count, the mean of the middle two."""
    out = {}
    for k, rows in stacked(updates).items():
        ordered, n = rows.sort(dim=0).values, rows.shape[0]
        out[k] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return out


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], trim: float) -> Params:
    """Coordinate-wise mean after dropping the ceil(trim * n) largest and smallest values
    (Yin et al. 2018): at least the `trim` share goes at each end, so 0.2 still trims one of 3;
    at least one value is always kept, so small rounds degrade to the median."""
    out = {}
    for k, rows in stacked(updates).items():
        n = rows.shape[0]
        cut = min(math.ceil(trim * n - 1e-9), (n - 1) // 2)
        out[k] = rows.sort(dim=0).values[cut : n - cut].mean(dim=0)
    return out
