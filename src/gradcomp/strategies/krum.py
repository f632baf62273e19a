"""(Multi-)Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent"): score each update by the summed squared distances to its n - f - 2 nearest
others (f: the malicious clients tolerated) and average the `multi` best-scored ones, so an update
far from the honest cluster is never chosen. Unweighted. FedAvg's server step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from gradcomp.strategies.aggregate import stacked
from gradcomp.strategies.base import ClientUpdate, Params, register
from gradcomp.strategies.fedavg import FedAvg, FedAvgConfig


class KrumConfig(FedAvgConfig):
    name: Literal["krum"] = "krum"  # type: ignore[assignment]  # each strategy's Config narrows `name`
    byzantine: int = Field(1, ge=0, description="f: malicious clients tolerated (scores use n - f - 2 neighbours)")
    multi: int = Field(1, ge=1, description="updates averaged: 1 is Krum, more is Multi-Krum")


def krum_scores(rows: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Per row of a (clients, features) matrix: summed squared distances to its n - f - 2 nearest
    other rows (at least one)."""
    n = rows.shape[0]
    dist = torch.cdist(rows.double(), rows.double()).pow(2)
    dist.fill_diagonal_(float("inf"))
    k = min(max(1, n - byzantine - 2), n - 1)
    return dist.sort(dim=1).values[:, :k].sum(dim=1) if n > 1 else torch.zeros(1, dtype=torch.float64)


@register
class Krum(FedAvg):
    """Picks rather than averages: the result is the mean of `multi` whole client updates."""

    Config = KrumConfig
    config: KrumConfig

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        """Krum's choice among the round's updates (ties: the earlier client name)."""
        by_name = stacked([u.delta for u in updates])
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in by_name.values()], dim=1)
        chosen = krum_scores(flat, self.config.byzantine).argsort(stable=True)[: self.config.multi]
        return {k: rows[chosen].mean(dim=0) for k, rows in by_name.items()}
