"""Server-side strategies: how the round's averaged update moves the global model.

One small interface, `Strategy.apply(params, delta) -> new params`, plus `state_dict()` /
`load_state_dict()` so a resumed coordinator continues with the same optimiser state.
FedAvg: x += lr * delta. FedAvgM (Hsu et al. 2019): server momentum on delta. FedAdam
(Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the pseudo-gradient delta.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Params = dict[str, torch.Tensor]


class Strategy(Protocol):
    name: str

    def apply(self, params: Params, delta: Params) -> Params:
        """New global parameters from the old ones and the round's averaged update."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """{'tensors': {name: tensor}, 'scalars': {name: number}}; restorable without pickle."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FedAvg:
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def apply(self, params: Params, delta: Params) -> Params:
        return {k: params[k] + self.server_lr * delta[k] for k in params}

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {}, "scalars": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FedAvgM:
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: Params = {}

    def apply(self, params: Params, delta: Params) -> Params:
        out = {}
        for k, p in params.items():
            v = self.velocity.get(k)
            v = delta[k].clone() if v is None else v.mul_(self.momentum).add_(delta[k])
            self.velocity[k] = v
            out[k] = p + self.server_lr * v
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {f"v.{k}": v.clone() for k, v in self.velocity.items()}, "scalars": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocity = {k[2:]: v.clone() for k, v in state["tensors"].items() if k.startswith("v.")}


class FedAdam:
    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: Params = {}
        self.v: Params = {}
        self.step = 0

    def apply(self, params: Params, delta: Params) -> Params:
        self.step += 1
        out = {}
        for k, p in params.items():
            d = delta[k]
            if k not in self.m:  # moments start at zero, allocated once per parameter
                self.m[k], self.v[k] = torch.zeros_like(d), torch.zeros_like(d)
            m = self.m[k].mul_(self.beta1).add_(d, alpha=1 - self.beta1)
            v = self.v[k].mul_(self.beta2).addcmul_(d, d, value=1 - self.beta2)
            out[k] = p + self.server_lr * m / (v.sqrt() + self.tau)
        return out

    def state_dict(self) -> dict[str, Any]:
        tensors = {f"m.{k}": t.clone() for k, t in self.m.items()}
        tensors.update({f"v.{k}": t.clone() for k, t in self.v.items()})
        return {"tensors": tensors, "scalars": {"step": self.step}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state["tensors"]
        self.m = {k[2:]: v.clone() for k, v in t.items() if k.startswith("m.")}
        self.v = {k[2:]: v.clone() for k, v in t.items() if k.startswith("v.")}
        self.step = int(state["scalars"].get("step", 0))


def make_strategy(name: str, **params: float) -> Strategy:
    """Build a strategy by name from the job's `strategy` section (unknown keys are ignored)."""
    if name == "fedavg":
        return FedAvg(params.get("server_lr", 1.0))
    if name == "fedavgm":
        return FedAvgM(params.get("server_lr", 1.0), params.get("momentum", 0.9))
    if name == "fedadam":
        return FedAdam(
            params.get("server_lr", 0.01), params.get("beta1", 0.9), params.get("beta2", 0.99), params.get("tau", 1e-3)
        )
    raise ValueError(f"unknown strategy {name!r}; use fedavg, fedavgm or fedadam")
