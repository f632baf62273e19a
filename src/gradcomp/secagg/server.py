"""The coordinator's side of one SecAgg+ round: relays, sums, and unmasks only the total.

Each `collect_*` takes the messages that arrived in one phase (whoever did not answer has dropped)
and returns the next phase's requests, or raises `RoundAborted`. The round aborts BEFORE any
unmasking request goes out (so no client reveals a share) when fewer than `min_survivors` clients
sent masked inputs, when some secret that must be rebuilt has fewer than t surviving holders, or
when the survivors' neighbourhood graph is split (the coordinator could then unmask the sum of
each part on its own). Clients that drop during unmasking are still summed; if too few shares
then arrive the round aborts with only shares of survivors' seeds and dropped clients' keys out,
which unmask no single input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gradcomp.secagg import crypto, masks, shamir
from gradcomp.secagg.client import mask_key, share_point
from gradcomp.secagg.graph import is_connected, neighbourhoods
from gradcomp.secagg.messages import (
    Advertise,
    MaskedInput,
    MaskedInputRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from gradcomp.secagg.params import SecAggParams


class RoundAborted(RuntimeError):
    """The round cannot finish; nothing it unmasked is released."""


class SecAggServer:
    def __init__(self, params: SecAggParams, round_id: bytes, dim: int, graph_seed: bytes):
        self.params, self.round_id, self.dim, self.graph_seed = params, round_id, dim, graph_seed
        self.ads: dict[int, Advertise] = {}
        self.graph: dict[int, frozenset[int]] = {}
        self.sharers: set[int] = set()  # U2
        self.survivors: set[int] = set()  # U3
        self.dropped: set[int] = set()  # in U2, not in U3, with surviving neighbours: masks to remove
        self.refused: dict[int, str] = {}  # clients whose messages were malformed: treated as dropped
        self._total = np.zeros(dim, dtype=np.uint64)

    def _need(self, count: int, what: str) -> None:
        if count < self.params.min_survivors:
            raise RoundAborted(f"{count} clients {what}, fewer than min_survivors = {self.params.min_survivors}")

    def collect_advertise(self, ads: Iterable[Advertise]) -> dict[int, ShareKeysRequest]:
        self.ads = {a.cid: a for a in ads}
        self._need(len(self.ads), "advertised keys")
        self.graph = neighbourhoods(self.ads, self.params.degree, self.graph_seed)
        short = [u for u, nb in self.graph.items() if len(nb) < self.params.threshold]
        if short:
            raise RoundAborted(f"{len(short)} clients have fewer than {self.params.threshold} neighbours")
        return {u: ShareKeysRequest(u, tuple(self.ads[v] for v in sorted(nb))) for u, nb in self.graph.items()}

    def collect_shares(self, responses: Iterable[ShareKeysResponse]) -> dict[int, MaskedInputRequest]:
        """Relays each share from a client that answered to its receiver, if that one answered too."""
        answered = {r.cid: r for r in responses if r.cid in self.graph and self._one_per_neighbour(r)}
        self._need(len(answered), "sent shares")
        self.sharers = set(answered)
        inbox: dict[int, list] = {u: [] for u in answered}
        for r in answered.values():
            for s in r.shares:
                if s.receiver in inbox:
                    inbox[s.receiver].append(s)
        return {u: MaskedInputRequest(u, tuple(shares)) for u, shares in inbox.items()}

    def _one_per_neighbour(self, r: ShareKeysResponse) -> bool:
        """Whether r holds one share from its sender to each neighbour; a client whose shares are not
        is treated as dropped before sharing (it cannot abort the round for everyone)."""
        ok = all(s.sender == r.cid for s in r.shares) and sorted(s.receiver for s in r.shares) == sorted(
            self.graph[r.cid]
        )
        if not ok:
            self.refused[r.cid] = "shares that are not one per neighbour"
        return ok

    def _well_formed(self, m: MaskedInput) -> bool:
        ok = m.bits == self.params.bits and m.y.shape == (self.dim,) and m.y.dtype == np.uint64
        ok = ok and (self.params.bits == 64 or not m.y.size or int(m.y.max()) >> self.params.bits == 0)
        if not ok:
            self.refused[m.cid] = "a masked input of the wrong shape or range"
        return ok

    def _holders(self, u: int) -> frozenset[int]:
        """The surviving clients that hold shares of u's secrets."""
        return self.graph[u] & self.survivors

    def collect_masked(self, inputs: Iterable[MaskedInput]) -> dict[int, UnmaskRequest]:
        """Adds the masked inputs of U3; asks each survivor for the shares needed to unmask the sum."""
        got = {m.cid: m for m in inputs if m.cid in self.sharers and self._well_formed(m)}
        self.survivors = set(got)
        self._need(len(got), "sent masked inputs")
        self.dropped = self._dropped()
        needed = self.survivors | self.dropped
        short = [u for u in needed if len(self._holders(u)) < self.params.threshold]
        if short:
            raise RoundAborted(f"{len(short)} secrets have fewer than {self.params.threshold} surviving holders")
        if not is_connected(self.survivors, self.graph):
            raise RoundAborted("the survivors' neighbourhood graph is split")
        for m in got.values():
            self._total += m.y
        return {
            u: UnmaskRequest(
                u, tuple(sorted(self.graph[u] & self.survivors)), tuple(sorted(self.graph[u] & self.dropped))
            )
            for u in sorted(self.survivors)
        }

    def _dropped(self) -> set[int]:
        """Clients that sent shares but no masked input: their pairwise masks are in the survivors' inputs."""
        return {v for v in self.sharers - self.survivors if self.graph[v] & self.survivors}

    def finish(self, responses: Iterable[UnmaskResponse]) -> np.ndarray:
        """The sum over U3 of the clients' inputs, in Z_(2^bits)."""
        b_shares: dict[int, dict[int, bytes]] = {u: {} for u in self.survivors}
        sk_shares: dict[int, dict[int, bytes]] = {v: {} for v in self.dropped}
        for r in responses:
            if r.cid not in self.survivors:
                continue
            for part, into in ((r.self_mask_shares, b_shares), (r.key_shares, sk_shares)):
                for v, share in part.items():
                    if v in into and r.cid in self.graph[v]:
                        into[v][share_point(r.cid)] = share
        bits = self.params.bits
        total = masks.apply(self._total.copy(), [], [self._rebuild(u, s) for u, s in b_shares.items()], bits)
        for v, shares in sk_shares.items():
            plus, minus = self._pair_keys(v, self._rebuild(v, shares))
            total = masks.apply(total, plus, minus, bits)
        return total

    def _rebuild(self, u: int, shares: dict[int, bytes]) -> bytes:
        try:
            return shamir.combine(shares, self.params.threshold)
        except shamir.ShamirError as e:
            raise RoundAborted(f"the secret of client {u} cannot be rebuilt: {e}") from e

    def _pair_keys(self, v: int, sk_raw: bytes) -> tuple[Sequence[bytes], Sequence[bytes]]:
        """The masks a dropped v left in its surviving neighbours' inputs, as (to add, to subtract)."""
        sk = crypto.private_from_bytes(sk_raw)
        if crypto.public_bytes(sk) != self.ads[v].s_pk:
            raise RoundAborted(f"the rebuilt mask key of client {v} does not match its advertised key")
        keys = {u: mask_key(sk, self.ads[u].s_pk, self.round_id, u, v) for u in self.graph[v] & self.survivors}
        # u added +PRG(s_uv) when v < u and -PRG(s_uv) when v > u; undo both
        return [k for u, k in keys.items() if v > u], [k for u, k in keys.items() if v < u]
