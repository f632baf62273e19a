"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the `trim` share of the
largest and of the smallest client values and average the rest. Tolerates up to ceil(trim * n)
malicious clients per side while averaging more honest values than the median does. Unweighted,
like the median. FedAvg's server step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from gradcomp.strategies.aggregate import trimmed_mean
from gradcomp.strategies.base import ClientUpdate, Params, register
from gradcomp.strategies.fedavg import FedAvg, FedAvgConfig


class TrimmedMeanConfig(FedAvgConfig):
    name: Literal["trimmed_mean"] = "trimmed_mean"  # type: ignore[assignment]  # each strategy's Config narrows `name`
    trim: float = Field(
        0.2,
        ge=0,
        lt=0.5,
        description="share of the clients dropped at each end, per coordinate (ceil(trim * n), at least one kept)",
    )


@register
class TrimmedMean(FedAvg):
    Config = TrimmedMeanConfig
    config: TrimmedMeanConfig

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        return trimmed_mean([u.delta for u in updates], self.config.trim)
