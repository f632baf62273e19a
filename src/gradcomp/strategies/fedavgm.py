"""FedAvgM (Hsu et al. 2019): heavy-ball momentum on the averaged update at the server."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gradcomp.strategies.base import Params, Strategy, StrategyConfig, StrategyState, register


class FedAvgMConfig(StrategyConfig):
    name: Literal["fedavgm"] = "fedavgm"
    server_lr: float = Field(1.0, gt=0, description="step along the server velocity")
    momentum: float = Field(0.9, ge=0, lt=1, description="server momentum")


@register
class FedAvgM(Strategy):
    Config = FedAvgMConfig
    config: FedAvgMConfig

    def __init__(self, config: FedAvgMConfig | None = None, *, key: bytes | None = None):
        super().__init__(config, key=key)
        self.velocity: Params = {}

    def apply(self, params: Params, aggregate: Params) -> Params:
        out = {}
        for k, p in params.items():
            v = self.velocity.get(k)
            v = aggregate[k].clone() if v is None else v.mul_(self.config.momentum).add_(aggregate[k])
            self.velocity[k] = v
            out[k] = p + self.config.server_lr * v
        return out

    def state_dict(self) -> StrategyState:
        return {"tensors": {f"v.{k}": v.clone() for k, v in self.velocity.items()}, "scalars": {}}

    def load_state_dict(self, state: StrategyState) -> None:
        self.velocity = {k[2:]: v.clone() for k, v in state["tensors"].items() if k.startswith("v.")}
