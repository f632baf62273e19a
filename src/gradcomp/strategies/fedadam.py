"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the pseudo-gradient."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from gradcomp.strategies.base import Params, Strategy, StrategyConfig, StrategyState, register


class FedAdamConfig(StrategyConfig):
    name: Literal["fedadam"] = "fedadam"
    server_lr: float = Field(0.01, gt=0, description="server Adam step size (the paper's eta)")
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay")
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay")
    tau: float = Field(1e-3, gt=0, description="adaptivity (Adam's epsilon)")


@register
class FedAdam(Strategy):
    Config = FedAdamConfig
    config: FedAdamConfig

    def __init__(self, config: FedAdamConfig | None = None, *, key: bytes | None = None):
        super().__init__(config, key=key)
        self.m: Params = {}
        self.v: Params = {}
        self.step = 0

    def apply(self, params: Params, aggregate: Params) -> Params:
        c = self.config
        self.step += 1
        out = {}
        for k, p in params.items():
            d = aggregate[k]
            if k not in self.m:  # moments start at zero, allocated once per parameter
                self.m[k], self.v[k] = torch.zeros_like(d), torch.zeros_like(d)
            m = self.m[k].mul_(c.beta1).add_(d, alpha=1 - c.beta1)
            v = self.v[k].mul_(c.beta2).addcmul_(d, d, value=1 - c.beta2)
            out[k] = p + c.server_lr * m / (v.sqrt() + c.tau)
        return out

    def state_dict(self) -> StrategyState:
        tensors = {f"m.{k}": t.clone() for k, t in self.m.items()}
        tensors.update({f"v.{k}": t.clone() for k, t in self.v.items()})
        return {"tensors": tensors, "scalars": {"step": self.step}}

    def load_state_dict(self, state: StrategyState) -> None:
        t = state["tensors"]
        self.m = {k[2:]: v.clone() for k, v in t.items() if k.startswith("m.")}
        self.v = {k[2:]: v.clone() for k, v in t.items() if k.startswith("v.")}
        self.step = int(state["scalars"].get("step", 0))
