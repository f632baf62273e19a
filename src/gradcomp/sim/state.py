"""Per-client state of a simulation, kept in the driver, compact, and only as big as it must be.

A virtual client is: its shard (int32 example indices), its dropout probability and
straggler flag, how often it has trained, and, once it has trained with an error-feedback
spec, its residual as one flat float32 vector (`pack_residuals`). Its randomness needs no
state: it is keyed by (job seed, client name, round), see `fedclient.seeds`. Actors hold none of
it between calls, so a thousand clients cost a thousand of these records, not a thousand
models, and any actor can serve any client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ClientState:
    cid: int
    indices: np.ndarray  # int32 example indices of this client's shard
    dropout: float = 0.0
    straggler: bool = False
    participations: int = 0
    ef: np.ndarray | None = None  # flat float32 residual (model order), None until needed
    strategy_state: np.ndarray | None = None  # the strategy's client state, packed alike (SCAFFOLD's c_i)

    @property
    def num_examples(self) -> int:
        return int(self.indices.size)

    def nbytes(self) -> int:
        held = sum(a.nbytes for a in (self.ef, self.strategy_state) if a is not None)
        return int(self.indices.nbytes + held + 64)


def client_name(cid: int) -> str:
    """The name virtual client `cid` has at the coordinator (and its randomness is keyed by)."""
    return f"sim-{cid}"


def client_id(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def pack_residuals(residuals: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Error-feedback residuals as one float32 vector in model order (zeros where a tensor has none)."""
    parts = []
    for k, t in like.items():
        r = residuals.get(k)
        n = t.numel()
        parts.append(np.zeros(n, dtype=np.float32) if r is None else r.detach().reshape(-1).float().numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def unpack_residuals(flat: np.ndarray | None, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `pack_residuals` (empty for a client without memory yet)."""
    if flat is None:
        return {}
    out, at = {}, 0
    for k, t in like.items():
        n = t.numel()
        out[k] = torch.from_numpy(flat[at : at + n].copy())
        at += n
    return out


def unpack_shaped(flat: np.ndarray | None, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`unpack_residuals` with each tensor in its model tensor's shape (a strategy's client state)."""
    return {k: v.view_as(like[k]) for k, v in unpack_residuals(flat, like).items()}


@dataclass
class ClientTable:
    """All clients of one simulation."""

    clients: list[ClientState] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, cid: int) -> ClientState:
        return self.clients[cid]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.clients)

    @classmethod
    def build(
        cls,
        parts: list[np.ndarray],
        *,
        dropout: float,
        straggler_fraction: float,
        seed: int,
        dropout_spread: float = 0.0,
    ) -> ClientTable:
        rng = np.random.default_rng([seed, 7])
        n = len(parts)
        slow = np.zeros(n, dtype=bool)
        n_slow = round(straggler_fraction * n)
        if n_slow:
            slow[rng.choice(n, size=n_slow, replace=False)] = True
        drops = client_dropouts(n, dropout, dropout_spread, seed)
        return cls([ClientState(i, p, float(drops[i]), bool(slow[i])) for i, p in enumerate(parts)])


def client_dropouts(n: int, mean: float, spread: float, seed: int) -> np.ndarray:
    """Each client's dropout probability: all `mean`, or Beta-distributed around it when spread > 0.

    Beta(mean * c, (1 - mean) * c) with c = 1/spread - 1 has mean `mean` and variance
    spread * mean * (1 - mean): spread 0 is a uniform population, spread near 1 splits it into
    clients that are almost always there and clients that almost never are.
    """
    if spread == 0.0 or mean == 0.0:
        return np.full(n, mean)
    if not 0.0 < mean < 1.0 or not 0.0 < spread < 1.0:
        raise ValueError(f"dropout must be in [0, 1) and dropout_spread in [0, 1), got {mean} and {spread}")
    c = 1.0 / spread - 1.0
    return np.random.default_rng([seed, 8]).beta(mean * c, (1.0 - mean) * c, size=n)
