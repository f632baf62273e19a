"""Central client-level DP as a wrapper around any mean-aggregating strategy (DP-FedAvg,
McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models").

The wrapped strategy still picks the clients and takes the server step; only the aggregate
changes: (sum_i clip(u_i) + N(0, (z * clip)^2)) / m, with m the clients asked per round. The
fixed denominator keeps the sum's sensitivity at `clip` whoever reports, so the noise
multiplier the accountant uses is exactly z (adversary: anyone who sees the aggregates and
everything after them; assumption: the coordinator adds the noise honestly). Example weights
are dropped on purpose: weighting by a client's own count would change the sensitivity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradcomp.strategies.aggregate import clipped_sum
from gradcomp.strategies.base import ClientUpdate, Params, Strategy, StrategyState

NOISE_SEED_OFFSET = 7919  # the noise stream is seeded by the job seed + this, apart from client sampling
_RNG_KEY = "dp_noise_rng"


class CentralDP(Strategy):
    """`inner` with its aggregate replaced by the clipped, noised, fixed-denominator sum."""

    def __init__(self, inner: Strategy, *, clip: float, noise_multiplier: float, expected_clients: int, seed: int):
        if not inner.aggregates_by_mean():
            raise ValueError(
                f"central DP cannot wrap strategy {inner.name!r}: its aggregate is not the mean, so the noise "
                "calibrated for the clipped mean would not bound its sensitivity"
            )
        super().__init__(inner.config, seed=inner.seed)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]  # an instance reports the strategy it wraps
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.expected_clients = max(1, expected_clients)
        self.generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)

    def configure_round(self, round: int, attempt: int, available: Sequence[str], num_clients: int) -> list[str]:
        return self.inner.configure_round(round, attempt, available, num_clients)

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        total = clipped_sum([u.delta for u in updates], self.clip)
        std = self.noise_multiplier * self.clip
        for t in total.values():
            if std > 0:
                t.add_(torch.randn(t.shape, generator=self.generator) * std)
            t.div_(self.expected_clients)
        return total

    def apply(self, params: Params, aggregate: Params) -> Params:
        return self.inner.apply(params, aggregate)

    def state_dict(self) -> StrategyState:
        state = self.inner.state_dict()
        scalars = {**state["scalars"], _RNG_KEY: self.generator.get_state().tolist()}
        return {"tensors": state["tensors"], "scalars": scalars}

    def load_state_dict(self, state: StrategyState) -> None:
        scalars = dict(state["scalars"])
        rng = scalars.pop(_RNG_KEY, None)
        if rng is not None:
            self.generator.set_state(torch.tensor(rng, dtype=torch.uint8))
        self.inner.load_state_dict({"tensors": state["tensors"], "scalars": scalars})
