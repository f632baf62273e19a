"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each client's drift on non-IID data.

The server keeps a control variate c (one tensor per model tensor) and serves it beside the model
as `CONTROL/<name>`. A client keeps its own c_i across rounds and trains on its loss plus
<c - c_i, w>, whose gradient adds the correction c - c_i to every local step (the paper's
y <- y - lr (g(y) - c_i + c)). After K local steps it sets c_i+ = c_i - c + (x - y) / (K lr)
(the paper's option II) and sends dc_i = c_i+ - c_i as `CONTROL_DELTA/<name>` beside its model
update. The server moves x by the mean model delta (FedAvg's step, `server_lr`) and
c <- c + (|S| / N) mean(dc_i), N the job's expected number of clients.

The control deltas leave the client without compression or noise: a job refuses SCAFFOLD under
local DP or secure aggregation (config.fed), and central DP refuses it as it refuses any strategy
with its own `aggregate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from gradcomp.strategies.aggregate import weighted_average
from gradcomp.strategies.base import ClientUpdate, StrategyState, register
from gradcomp.strategies.client_half import ClientHalf, Params, tensor_sum
from gradcomp.strategies.fedavg import FedAvg, FedAvgConfig

CONTROL = "scaffold.c/"  # served beside the model: the server's control variate
CONTROL_DELTA = "scaffold.dc/"  # sent beside the update: the client's control-variate change


class ScaffoldConfig(FedAvgConfig):
    name: Literal["scaffold"] = "scaffold"  # type: ignore[assignment]  # each strategy's Config narrows `name`


class ScaffoldClient(ClientHalf):
    stateful = True

    @classmethod
    def served_names(cls, names: Sequence[str]) -> dict[str, str]:
        return {CONTROL + k: k for k in names}

    @classmethod
    def update_names(cls, names: Sequence[str]) -> dict[str, str]:
        return {CONTROL_DELTA + k: k for k in names}

    def update_extras(self, old_state: Params, new_state: Params) -> Params:
        """dc_i = c_i+ - c_i."""
        return {CONTROL_DELTA + k: v - old_state.get(k, torch.zeros_like(v)) for k, v in new_state.items()}

    def anchors(self, global_params: Params, state: Params) -> Params | None:
        """c - c_i per model tensor (c_i starts at zero)."""
        names = [k for k in global_params if not k.startswith(CONTROL)]
        return {k: global_params[CONTROL + k] - state.get(k, torch.zeros_like(global_params[k])) for k in names}

    def penalty(self, params: Params, anchors: Params) -> torch.Tensor:
        return tensor_sum((params[k] * anchors[k]).sum() for k in params)

    def after_round(self, global_params: Params, local_params: Params, steps: int, lr: float, state: Params) -> Params:
        """c_i+ = c_i - c + (x - y) / (K lr)."""
        new = {}
        for k, y in local_params.items():
            c_i = state.get(k, torch.zeros_like(y))
            new[k] = c_i - global_params[CONTROL + k] + (global_params[k] - y) / (max(steps, 1) * lr)
        return new


@register
class Scaffold(FedAvg):
    Config = ScaffoldConfig
    config: ScaffoldConfig
    client_half = ScaffoldClient

    def __init__(self, config: ScaffoldConfig | None = None, *, key: bytes | None = None):
        super().__init__(config, key=key)
        self.control: Params = {}

    def served_extras(self, params: Mapping[str, torch.Tensor]) -> Params:
        """The control variate, served with the model (zero before the first round)."""
        return {CONTROL + k: self.control.get(k, torch.zeros_like(v)) for k, v in params.items()}

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        model = [
            (u.mean_weight, {k: v for k, v in u.delta.items() if not k.startswith(CONTROL_DELTA)}) for u in updates
        ]
        mean_dc = weighted_average([(1.0, _control_deltas(u.delta)) for u in updates])
        share = min(1.0, len(updates) / max(self.population, 1))
        for k, dc in mean_dc.items():
            self.control[k] = self.control.get(k, torch.zeros_like(dc)) + share * dc
        return weighted_average(model)

    def state_dict(self) -> StrategyState:
        return {"tensors": {f"c.{k}": v.clone() for k, v in self.control.items()}, "scalars": {}}

    def load_state_dict(self, state: StrategyState) -> None:
        self.control = {k[2:]: v.clone() for k, v in state["tensors"].items() if k.startswith("c.")}


def _control_deltas(delta: Mapping[str, torch.Tensor]) -> Params:
    return {k[len(CONTROL_DELTA) :]: v for k, v in delta.items() if k.startswith(CONTROL_DELTA)}


def _model_delta(delta: Mapping[str, torch.Tensor]) -> Params:
    return {k: v for k, v in delta.items() if not k.startswith(CONTROL_DELTA)}
