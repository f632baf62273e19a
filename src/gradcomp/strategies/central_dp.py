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

from gradcomp.keyed_random import KeyedStream, check_key, new_key, subkey
from gradcomp.strategies.aggregate import clipped_sum
from gradcomp.strategies.base import ClientUpdate, Params, Strategy, StrategyState

# Checkpoints of format 2 and 3 carry the state of the old job-seeded noise generator: not used.
_LEGACY_RNG = "dp_noise_rng"


class CentralDP(Strategy):
    """`inner` with its aggregate replaced by the clipped, noised, fixed-denominator sum.

    Round r's noise is drawn from a `KeyedStream` under HMAC(`noise_key`, r): reproducible by the
    holder of the key (the coordinator, and a coordinator resumed from its checkpoint, which keeps
    the key), unpredictable to clients, who know the job seed, the released models and their own
    updates (noise seeded from the job seed, which every client knows, would let a client subtract it
    and recover the exact sum of the clipped updates). A resumed coordinator therefore adds the same noise to a round as
    the run it continues, with no generator state to carry.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip: float,
        noise_multiplier: float,
        expected_clients: int,
        noise_key: bytes | None = None,
    ):
        if not inner.aggregates_by_mean():
            raise ValueError(
                f"central DP cannot wrap strategy {inner.name!r}: its aggregate is not the mean, so the noise "
                "calibrated for the clipped mean would not bound its sensitivity"
            )
        super().__init__(inner.config, key=inner.key)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]  # an instance reports the strategy it wraps
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.expected_clients = max(1, expected_clients)
        self.noise_key = check_key(noise_key, "central DP noise key") if noise_key is not None else new_key()

    def configure_round(self, round: int, attempt: int, available: Sequence[str], num_clients: int) -> list[str]:
        return self.inner.configure_round(round, attempt, available, num_clients)

    def round_noise(self, round: int) -> KeyedStream:
        """The stream round `round`'s noise is drawn from (tensors in the aggregate's order)."""
        return KeyedStream(subkey(self.noise_key, "central-dp-noise", round))

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> Params:
        total = clipped_sum([u.delta for u in updates], self.clip)
        std = self.noise_multiplier * self.clip
        stream = self.round_noise(round)
        for t in total.values():
            if std > 0:
                t.add_(stream.normal(t.shape, t.dtype, t.device) * std)
            t.div_(self.expected_clients)
        return total

    def apply(self, params: Params, aggregate: Params) -> Params:
        return self.inner.apply(params, aggregate)

    def state_dict(self) -> StrategyState:
        return self.inner.state_dict()

    def load_state_dict(self, state: StrategyState) -> None:
        scalars = {k: v for k, v in state["scalars"].items() if k != _LEGACY_RNG}
        self.inner.load_state_dict({"tensors": state["tensors"], "scalars": scalars})
