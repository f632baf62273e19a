"""The strategy interface: how the coordinator picks a round's clients, combines their updates
and moves the global model (in the spirit of Flower's `Strategy`).

A round, as `server.core.Coordinator` drives it:

1. `configure_round(round, attempt, available, num_clients) -> [client names]`: which clients to ask
   (attempt > 0 is a retry asking for more; `available` excludes clients already in the round).
2. `aggregate(round, updates) -> Params`: every accepted update of the round at once, each a
   `ClientUpdate(client, num_examples, delta)` with `delta` the decoded dense float tensors of
   local - global, already validated (names, shapes, dtypes, finite). Returns the round's
   update (the "pseudo-gradient"), same names and shapes.
3. `apply(params, aggregate) -> Params`: the server optimiser step; returns new tensors (the
   coordinator never mutates a published params dict).

Its client half (`client_half`, a `client_half.ClientHalf` class) is what its clients train with,
given the settings `client_settings(config)` sends them in every `TrainingConfig`; the default
half is plain local SGD on the task's loss.

`state_dict()` / `load_state_dict()` carry everything a resumed coordinator needs:
`{"tensors": {name: float tensor}, "scalars": {name: JSON value}}` (stored without pickle).

Plugging in a strategy is one new module in this package: a pydantic `StrategyConfig`
subclass with `name: Literal["x"] = "x"` and the hyperparameters with their defaults (the only
place a default is written; job files are validated against it), and a `Strategy` subclass
decorated with `@register` whose `Config` is that model. A robust aggregator (`median`,
`trimmed_mean`, `norm_bounded`) overrides `aggregate` and inherits the server step, e.g.
`class Median(FedAvg)` with its own `Config`. Central DP wraps any strategy whose `aggregate`
is the default weighted mean (`central_dp.CentralDP`); one that overrides `aggregate` is refused
there, since the noise is calibrated for the clipped mean's sensitivity.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from gradcomp.config.common import StrictModel
from gradcomp.keyed_random import check_key, new_key, subkey
from gradcomp.strategies.aggregate import weighted_average
from gradcomp.strategies.client_half import ClientHalf

Params = dict[str, torch.Tensor]
StrategyState = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted update: who sent it, how many examples it claims, its dense delta."""

    client: str
    num_examples: int
    delta: Params
    weight: float | None = None  # the mean's weight after the coordinator's share cap; None: num_examples

    @property
    def mean_weight(self) -> float:
        """What a weighted mean gives this update: the capped share, else the example count."""
        return float(self.num_examples if self.weight is None else self.weight)


class StrategyConfig(StrictModel):
    """Base of every strategy's job-file section (`strategy:`); subclasses fix `name` to a Literal."""

    name: str


class Strategy:
    """FedAvg's round structure with no server step of its own; subclasses add `apply`."""

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]]
    client_half: ClassVar[type[ClientHalf]] = ClientHalf

    def __init__(self, config: StrategyConfig | None = None, *, key: bytes | None = None):
        self.config = config if config is not None else self.Config()  # type: ignore[call-arg]  # each Config defaults `name`
        # The secret client sampling is drawn from (the coordinator's, `server.core`); fresh when not given.
        self.key = check_key(key, "strategy key") if key is not None else new_key()
        self.population = 1  # the job's expected number of clients (`strategy_for_job` sets it)

    def served_extras(self, params: Mapping[str, torch.Tensor]) -> Params:
        """Tensors served beside the model (`client_half.served_names` names them); none by default."""
        return {}

    def update_spec(self, params: Mapping[str, torch.Tensor]) -> Params:
        """The model tensors and the extras an update carries (`client_half.update_names`), as templates."""
        extras = self.client_half.update_names(list(params))
        return {**params, **{extra: params[src] for extra, src in extras.items()}}

    @classmethod
    def client_settings(cls, config: StrategyConfig) -> dict[str, float]:
        """What the clients' half is told (`TrainingConfig.strategy_settings`); none by default."""
        return {}

    @classmethod
    def aggregates_by_mean(cls) -> bool:
        """True when `aggregate` is the example-weighted mean (what central DP may replace)."""
        return cls.aggregate is Strategy.aggregate

    def configure_round(self, round: int, attempt: int, available: Sequence[str], num_clients: int) -> list[str]:
        """Uniform sample without replacement, drawn from HMAC(key, round, attempt): the same for the same
        key (a resumed coordinator), unpredictable without it (amplification by sampling assumes a secret
        sample; a client knows the job seed, so the sample must not come from it)."""
        rng = random.Random(subkey(self.key, "select", round, attempt))
        return sorted(rng.sample(sorted(available), min(num_clients, len(available))))

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        """FedAvg: the mean of the deltas weighted by example counts (capped per `mean_weight`)."""
        return weighted_average([(u.mean_weight, u.delta) for u in updates])

    def apply(self, params: Params, aggregate: Params) -> Params:
        """New global parameters from the old ones and the round's aggregate."""
        raise NotImplementedError

    def state_dict(self) -> StrategyState:
        return {"tensors": {}, "scalars": {}}

    def load_state_dict(self, state: StrategyState) -> None:
        return None


S = TypeVar("S", bound=type[Strategy])
REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: S) -> S:
    """Class decorator: make a strategy selectable as `strategy.name` in job files; the class's
    `name` is taken from its Config, so the name is written once."""
    name = cls.Config.model_fields["name"].default
    cls.name = name
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise TypeError(f"two strategies named {name!r}: {REGISTRY[name].__name__} and {cls.__name__}")
    REGISTRY[name] = cls
    return cls
