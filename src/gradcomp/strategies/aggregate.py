"""Pure functions on dense updates that strategies combine: norms, clipping, weighted means, sums.

No rounds, clients or gRPC here, so every rule is testable on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Params = dict[str, torch.Tensor]


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of an update taken together (the quantity DP clipping bounds)."""
    if not update:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in update.values()])))


def clip_update(update: Mapping[str, torch.Tensor], clip: float) -> tuple[Params, float]:
    """Scale the whole update to L2 norm <= clip (one client's contribution); returns (update, old norm)."""
    norm = global_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


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
