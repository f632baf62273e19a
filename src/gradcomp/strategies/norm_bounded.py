"""Norm-bounded FedAvg (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): each
update is scaled to L2 norm <= a bound, then averaged with the (capped) example weights. Without
a configured `clip` the bound is the round's median update norm, so an honest majority sets it
whatever the model's scale. FedAvg's server step."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from gradcomp.strategies.aggregate import clip_update, global_norm, weighted_average
from gradcomp.strategies.base import ClientUpdate, Params, register
from gradcomp.strategies.fedavg import FedAvg, FedAvgConfig


class NormBoundedConfig(FedAvgConfig):
    name: Literal["norm_bounded"] = "norm_bounded"  # type: ignore[assignment]  # each strategy's Config narrows `name`
    clip: float | None = Field(
        None, gt=0, description="L2 bound on each update; unset: the median of the round's update norms"
    )


@register
class NormBounded(FedAvg):
    Config = NormBoundedConfig
    config: NormBoundedConfig

    def bound(self, updates: Sequence[ClientUpdate]) -> float:
        """The round's clip: the configured one, else the median update norm."""
        if self.config.clip is not None:
            return self.config.clip
        return statistics.median(global_norm(u.delta) for u in updates)

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        clip = self.bound(updates)
        return weighted_average([(u.mean_weight, clip_update(u.delta, clip)[0]) for u in updates])
