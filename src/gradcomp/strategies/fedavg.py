"""FedAvg (McMahan et al. 2017): x += server_lr * mean of the clients' deltas (weighted by examples)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradcomp.strategies.base import Params, Strategy, StrategyConfig, register


class FedAvgConfig(StrategyConfig):
    name: Literal["fedavg"] = "fedavg"
    server_lr: float = Field(1.0, gt=0, description="step along the averaged update (1.0: plain FedAvg)")


@register
class FedAvg(Strategy):
    Config = FedAvgConfig
    config: FedAvgConfig

    def apply(self, params: Params, aggregate: Params) -> Params:
        lr = self.config.server_lr
        return {k: params[k] + lr * aggregate[k] for k in params}
