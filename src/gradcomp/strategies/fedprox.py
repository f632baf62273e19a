"""FedProx (Li et al. 2020): each client minimises its loss plus (mu / 2) ||w - w_global||^2.

The proximal term keeps heterogeneous clients' local models near the global one. The server
half is FedAvg's; mu reaches the clients as a strategy setting and the term is the client half's
penalty, so both local-training paths (sequential and vectorised) apply it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from gradcomp.strategies.base import StrategyConfig, register
from gradcomp.strategies.client_half import ClientHalf, Params, tensor_sum
from gradcomp.strategies.fedavg import FedAvg, FedAvgConfig

MAX_MU = 100.0


class FedProxConfig(FedAvgConfig):
    name: Literal["fedprox"] = "fedprox"  # type: ignore[assignment]  # each strategy's Config narrows `name`
    mu: float = Field(0.01, gt=0, le=MAX_MU, description="weight of the proximal term (mu / 2) ||w - w_global||^2")


class FedProxClient(ClientHalf):
    bounds = {"mu": (0.0, MAX_MU)}

    def anchors(self, global_params: Params, state: Params) -> Params | None:
        return global_params

    def penalty(self, params: Params, anchors: Params) -> torch.Tensor:
        mu = self.settings.get("mu", 0.0)
        return 0.5 * mu * tensor_sum(((params[k] - anchors[k]) ** 2).sum() for k in params)


@register
class FedProx(FedAvg):
    Config = FedProxConfig
    config: FedProxConfig
    client_half = FedProxClient

    @classmethod
    def client_settings(cls, config: StrategyConfig) -> dict[str, float]:
        assert isinstance(config, FedProxConfig)
        return {"mu": config.mu}
