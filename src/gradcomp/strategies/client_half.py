"""A strategy's client half: the settings it sends its clients and what it changes in their local training.

A strategy that trains differently on the client (FedProx's proximal term, SCAFFOLD's control
variates) says so here, next to its server half, instead of in the client runtime. The change is
a term added to the task's local loss, `penalty(params, anchors)`, a pure tensor function of the
client's current parameters and per-round `anchors` (tensors fixed for the round: the global
model for FedProx, the control-variate correction for SCAFFOLD). Both local-training paths use
it unchanged: the sequential trainer differentiates it with autograd, the vectorised cohort
with `vmap(grad(...))`, so the client step is written once.

Settings travel in `TrainingConfig.strategy_settings`; a client accepts only the names its half
declares, within the half's bounds (`check_settings`), so a coordinator cannot make a client
train with a setting it does not understand or an extreme value.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradcomp.errors import GradcompError

Params = dict[str, torch.Tensor]

MAX_SETTINGS = 16


class SettingsRefused(GradcompError, ValueError):
    """Strategy settings a client will not train with."""


class ClientHalf:
    """The default client half: local SGD on the task's loss alone (FedAvg and its server-side variants)."""

    # setting name -> (lowest, highest) value a client accepts
    bounds: ClassVar[dict[str, tuple[float, float]]] = {}
    # the client keeps per-client state across rounds (checkpointed with its error-feedback memory)
    stateful: ClassVar[bool] = False

    def __init__(self, settings: Mapping[str, float] | None = None):
        self.settings = check_settings(type(self).bounds, settings or {})

    @classmethod
    def served_names(cls, names: Sequence[str]) -> dict[str, str]:
        """Tensors served beside the model: extra name -> the model tensor whose shape and dtype it has."""
        return {}

    @classmethod
    def update_names(cls, names: Sequence[str]) -> dict[str, str]:
        """Tensors sent beside the update (dense, uncompressed): extra name -> its model tensor."""
        return {}

    def anchors(self, global_params: Params, state: Params) -> Params | None:
        """Per-round tensors `penalty` reads; None: no penalty (plain local SGD)."""
        return None

    def penalty(self, params: Params, anchors: Params) -> torch.Tensor:
        """A term added to the local loss (a pure tensor function: it also runs under vmap)."""
        raise NotImplementedError

    def after_round(self, global_params: Params, local_params: Params, steps: int, lr: float, state: Params) -> Params:
        """The client's state for the next round (only for stateful halves); `global_params` holds the
        served extras too."""
        return state

    def update_extras(self, old_state: Params, new_state: Params) -> Params:
        """The tensors named by `update_names`, from the state before and after this round."""
        return {}


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """t1 + t2 + ... of at least one tensor (the builtin sum's start of 0 types as int | Tensor)."""
    return functools.reduce(operator.add, terms)


def check_settings(bounds: Mapping[str, tuple[float, float]], settings: Mapping[str, float]) -> dict[str, float]:
    """The settings as floats, every name declared by the half and every value finite and in its bounds."""
    if len(settings) > MAX_SETTINGS:
        raise SettingsRefused(f"at most {MAX_SETTINGS} strategy settings, got {len(settings)}")
    unknown = sorted(set(settings) - set(bounds))
    if unknown:
        raise SettingsRefused(f"strategy settings {unknown} are not understood (known: {sorted(bounds) or 'none'})")
    out = {}
    for name, value in settings.items():
        low, high = bounds[name]
        v = float(value)
        if not (math.isfinite(v) and low <= v <= high):
            raise SettingsRefused(f"strategy setting {name}={value} is outside [{low}, {high}]")
        out[name] = v
    return out


@dataclass(frozen=True)
class Correction:
    """A client half's penalty with this round's anchors: the term local training adds to its loss."""

    half: ClientHalf
    anchors: Params

    def __call__(self, params: Params) -> torch.Tensor:
        return self.half.penalty(params, self.anchors)
