"""Federated strategies: client sampling, aggregation and the server step (see `base` for the
interface). Every module of this package is imported here, so a strategy registers itself by
existing: adding one is adding one file.

- `strategy_names()`, `strategy_class(name)`: what job files may name.
- `StrategySection`: the `strategy:` job-file type (a union of every strategy's `Config`,
  told apart by `name`; `strategy: fedadam` is short for `{name: fedadam}`; no name means fedavg).
- `build_strategy(config, key=...)`: the strategy a validated section describes, sampling clients
  from the secret `key`.
- `CentralDP` (in `central_dp`): the central-DP wrapper around any mean-aggregating strategy.
- `client_half(name, settings)`: the client half a client trains with, from its `TrainingConfig`.
- `strategy_for_job(job, secret)`: the strategy a federated job runs, wrapped in central DP when its
  `privacy.mode` says so (the one place that asks). It reads the job through `JobView`, because
  `config.fed` takes its `strategy:` section types from this package.
"""

from __future__ import annotations

import functools
import importlib
import operator
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeAlias

from pydantic import BeforeValidator, Field

from gradcomp.keyed_random import check_key, new_key, subkey
from gradcomp.strategies.base import REGISTRY, ClientUpdate, Params, Strategy, StrategyConfig, register
from gradcomp.strategies.central_dp import CentralDP
from gradcomp.strategies.client_half import ClientHalf, Correction, SettingsRefused

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT = "fedavg"


def _shorthand(value: Any) -> Any:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and "name" not in value:
        return {"name": DEFAULT, **value}
    return value


if TYPE_CHECKING:  # the union below is built from the registry at import time; each member is a StrategyConfig
    StrategySection: TypeAlias = StrategyConfig
else:
    StrategySection = Annotated[
        functools.reduce(operator.or_, [cls.Config for _, cls in sorted(REGISTRY.items())]),
        Field(discriminator="name"),
        BeforeValidator(_shorthand),
    ]


def strategy_names() -> list[str]:
    return sorted(REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(strategy_names())}") from None


def default_config() -> StrategyConfig:
    return REGISTRY[DEFAULT].Config()  # type: ignore[call-arg]  # every registered Config defaults `name`


def client_half(name: str, settings: Mapping[str, float]) -> ClientHalf:
    """The client half of strategy `name` with `settings` (refused: `SettingsRefused`). An empty
    name (a coordinator older than strategy settings) is FedAvg's plain local SGD."""
    if name and name not in REGISTRY:
        raise SettingsRefused(f"unknown strategy {name!r}; this client knows {', '.join(strategy_names())}")
    return REGISTRY[name or DEFAULT].client_half(settings)


def build_strategy(config: StrategyConfig, *, key: bytes | None = None) -> Strategy:
    """The strategy a validated `strategy:` section describes (its defaults are the Config's); it samples
    clients from the secret `key` (a fresh one when None)."""
    return strategy_class(config.name)(config, key=key)


class _Privacy(Protocol):
    @property
    def mode(self) -> str: ...
    @property
    def clip(self) -> float | None: ...
    @property
    def noise_multiplier(self) -> float | None: ...


class _Clients(Protocol):
    @property
    def expected(self) -> int: ...


class JobView(Protocol):
    """What of a federated job picks and wraps its strategy (read-only, so a job's own section types fit)."""

    @property
    def strategy(self) -> StrategyConfig: ...
    @property
    def privacy(self) -> _Privacy: ...
    @property
    def clients(self) -> _Clients: ...
    @property
    def clients_per_round(self) -> int: ...


def strategy_for_job(job: JobView, secret: bytes | None = None) -> Strategy:
    """The job's strategy, wrapped in central DP when `privacy.mode` is central; its client sampling
    and its noise are keyed by sub-keys of the coordinator's `secret` (a fresh one when None)."""
    secret = check_key(secret, "coordinator secret") if secret is not None else new_key()
    strategy = build_strategy(job.strategy, key=subkey(secret, "client-selection"))
    strategy.population = job.clients.expected
    if job.privacy.mode != "central":
        return strategy
    assert job.privacy.clip is not None and job.privacy.noise_multiplier is not None  # validated with the job
    return CentralDP(
        strategy,
        clip=job.privacy.clip,
        noise_multiplier=job.privacy.noise_multiplier,
        expected_clients=job.clients_per_round,
        noise_key=subkey(secret, "central-dp"),
    )


__all__ = [
    "ClientHalf",
    "ClientUpdate",
    "Correction",
    "JobView",
    "Params",
    "SettingsRefused",
    "Strategy",
    "StrategyConfig",
    "StrategySection",
    "build_strategy",
    "client_half",
    "default_config",
    "register",
    "strategy_class",
    "strategy_for_job",
    "strategy_names",
]
