"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning"): each
coordinate of the round's update is the median of the clients' values, so fewer than half of
the clients cannot drag it outside the honest range. Example counts are ignored on purpose
(a claimed count is exactly what a malicious client inflates). FedAvg's server step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from gradcomp.strategies.aggregate import coordinate_median
from gradcomp.strategies.base import ClientUpdate, Params, register
from gradcomp.strategies.fedavg import FedAvg, FedAvgConfig


class MedianConfig(FedAvgConfig):
    name: Literal["median"] = "median"  # type: ignore[assignment]  # each strategy's Config narrows `name`


@register
class Median(FedAvg):
    Config = MedianConfig
    config: MedianConfig

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        return coordinate_median([u.delta for u in updates])
