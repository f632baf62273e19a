"""The client's side of one SecAgg+ round: a state machine that answers each phase once.

It holds the round's secrets (two X25519 private keys, the self-mask seed b_u) and refuses any
request that would help the coordinator unmask one client's input: revealing, for the same
neighbour, both a share of its self-mask seed and a share of its mask key; answering a second
unmasking request (with a different view of who dropped); shares relayed from a non-neighbour or
for another round or pair (their AEAD check fails). A refused request aborts the client's round.
"""

from __future__ import annotations

import enum

import numpy as np

from gradcomp.keyed_random import new_key
from gradcomp.secagg import crypto, masks, shamir
from gradcomp.secagg.messages import (
    Advertise,
    EncryptedShare,
    MaskedInput,
    MaskedInputRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from gradcomp.secagg.params import SecAggParams


class ProtocolError(ValueError):
    """A request the client refuses; its round is over."""


class Phase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASK = "mask"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


def share_point(cid: int) -> int:
    """The Shamir point at which client `cid` holds its neighbours' shares."""
    return cid + 1


def share_context(round_id: bytes, sender: int, receiver: int) -> bytes:
    return crypto.context("share", round_id, sender, receiver)


def mask_key(own: crypto.X25519PrivateKey, peer_public: bytes, round_id: bytes, u: int, v: int) -> bytes:
    """s_uv: the pairwise mask key of u and v (the same from either side)."""
    return crypto.agree(own, peer_public, crypto.context("mask", round_id, min(u, v), max(u, v)))


class SecAggClient:
    """One client in one round; new keys and a new seed every round, so no mask is reused."""

    def __init__(self, cid: int, params: SecAggParams, round_id: bytes):
        self.cid, self.params, self.round_id = cid, params, round_id
        self.phase = Phase.ADVERTISE
        self._c_sk, self._s_sk = crypto.new_private(), crypto.new_private()
        self._seed = new_key()  # b_u
        self._neighbours: dict[int, Advertise] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (its b-share, its sk-share)

    def _enter(self, expected: Phase, then: Phase) -> None:
        if self.phase is not expected:
            raise ProtocolError(f"client {self.cid} is in phase {self.phase.value}, not {expected.value}")
        self.phase = then

    def _refuse(self, why: str) -> ProtocolError:
        self.phase = Phase.ABORTED
        return ProtocolError(f"client {self.cid} refuses: {why}")

    def advertise(self) -> Advertise:
        self._enter(Phase.ADVERTISE, Phase.SHARE)
        return Advertise(self.cid, crypto.public_bytes(self._c_sk), crypto.public_bytes(self._s_sk))

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysResponse:
        """Shamir-shares b_u and s_sk among the neighbours, each pair of shares sealed to its holder."""
        self._enter(Phase.SHARE, Phase.MASK)
        ads = {a.cid: a for a in request.neighbours}
        own = crypto.public_bytes(self._c_sk), crypto.public_bytes(self._s_sk)
        keys = [k for a in request.neighbours for k in (a.c_pk, a.s_pk)] + list(own)
        if request.cid != self.cid or self.cid in ads or len(ads) != len(request.neighbours):
            raise self._refuse("the neighbour list is not a set of other clients")
        if len(set(keys)) != len(keys):
            raise self._refuse("two advertised public keys are equal")
        if not self.params.threshold <= len(ads) <= self.params.degree:
            raise self._refuse(f"{len(ads)} neighbours, outside threshold..degree")
        self._neighbours = ads
        points = [share_point(v) for v in ads]
        b_shares = shamir.split(self._seed, self.params.threshold, points)
        sk_shares = shamir.split(crypto.private_bytes(self._s_sk), self.params.threshold, points)
        sealed = []
        for v, ad in ads.items():
            info = share_context(self.round_id, self.cid, v)
            key = crypto.agree(self._c_sk, ad.c_pk, info)
            plain = b_shares[share_point(v)] + sk_shares[share_point(v)]
            sealed.append(EncryptedShare(self.cid, v, crypto.seal(key, plain, info)))
        return ShareKeysResponse(self.cid, tuple(sealed))

    def _open(self, share: EncryptedShare) -> tuple[bytes, bytes]:
        sender = self._neighbours.get(share.sender)
        if share.receiver != self.cid or sender is None or share.sender in self._held:
            raise self._refuse(f"a share from {share.sender} to {share.receiver} is not for this client")
        info = share_context(self.round_id, share.sender, self.cid)
        try:
            plain = crypto.open_sealed(crypto.agree(self._c_sk, sender.c_pk, info), share.blob, info)
        except crypto.DecryptError as e:
            raise self._refuse(str(e)) from e
        return plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]

    def masked_input(self, request: MaskedInputRequest, x: np.ndarray) -> MaskedInput:
        """y = x + PRG(b_u) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv) mod 2^b, over the neighbours
        whose shares arrived (those that are still in the round)."""
        self._enter(Phase.MASK, Phase.UNMASK)
        if request.cid != self.cid:
            raise self._refuse("the request names another client")
        for share in request.shares:
            self._held[share.sender] = self._open(share)
        if len(self._held) < self.params.threshold:
            raise self._refuse(f"only {len(self._held)} neighbours left, fewer than the threshold")
        bits = self.params.bits
        pair = {v: mask_key(self._s_sk, self._neighbours[v].s_pk, self.round_id, self.cid, v) for v in self._held}
        plus = [self._seed] + [k for v, k in pair.items() if v < self.cid]
        minus = [k for v, k in pair.items() if v > self.cid]
        try:
            x = masks.check_ring(x, bits)
        except ValueError as e:
            raise self._refuse(f"its input is not in Z_(2^{bits}): {e}") from e
        y = masks.apply(x.copy(), plus, minus, bits)
        return MaskedInput(self.cid, bits, y)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Shares of b_v for survivors v, of s_sk_v for dropped v: never both for one client."""
        self._enter(Phase.UNMASK, Phase.DONE)
        alive, dropped = set(request.survivors), set(request.dropped)
        if request.cid != self.cid or len(alive) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise self._refuse("a malformed unmasking request")
        if alive & dropped:
            raise self._refuse(f"asked for both secrets of {sorted(alive & dropped)}")
        if not (alive | dropped) <= set(self._held):
            raise self._refuse("asked for shares this client does not hold")
        return UnmaskResponse(
            self.cid,
            {v: self._held[v][0] for v in request.survivors},
            {v: self._held[v][1] for v in request.dropped},
        )
