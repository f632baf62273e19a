"""The messages of one SecAgg+ round and their byte encoding.

Every message is a frozen dataclass with `to_bytes` / `from_bytes`: the same bytes serve a gRPC
`bytes` field and the in-process simulation, and `len(msg.to_bytes())` is the exact count of what
goes on the wire (before transport framing). Integers are big-endian; a masked vector is
little-endian words of `bits` bits.

Direction: Advertise, ShareKeysResponse, MaskedInput and UnmaskResponse go client -> coordinator;
ShareKeysRequest, MaskedInputRequest and UnmaskRequest go coordinator -> client.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from gradcomp.secagg.crypto import NONCE_BYTES, PUBLIC_BYTES, TAG_BYTES
from gradcomp.secagg.shamir import SHARE_BYTES

SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES  # a share of b_u, then a share of s_sk
SEALED_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES


class MessageError(ValueError):
    """Bytes that are not a well-formed message."""


def _head(fmt: str, data: bytes) -> tuple[int, ...]:
    """The fixed header `fmt` at the start of `data`; too few bytes is a MessageError, not struct.error."""
    if len(data) < struct.calcsize(fmt):
        raise MessageError(f"{len(data)} bytes are shorter than the {struct.calcsize(fmt)}-byte header")
    return struct.unpack_from(fmt, data)


def _ids(data: bytes, offset: int, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f">{count}I", data, offset)


def _records(data: bytes, offset: int, count: int, size: int) -> list[bytes]:
    if len(data) != offset + count * size:
        raise MessageError(f"expected {offset + count * size} bytes, got {len(data)}")
    return [data[offset + i * size : offset + (i + 1) * size] for i in range(count)]


@dataclass(frozen=True)
class Advertise:
    cid: int
    c_pk: bytes  # encrypts the shares sent to this client
    s_pk: bytes  # agrees the pairwise masks

    SIZE = 4 + 2 * PUBLIC_BYTES

    def to_bytes(self) -> bytes:
        return struct.pack(">I", self.cid) + self.c_pk + self.s_pk

    @classmethod
    def from_bytes(cls, data: bytes) -> Advertise:
        if len(data) != cls.SIZE:
            raise MessageError(f"an advertisement is {cls.SIZE} bytes, got {len(data)}")
        return cls(struct.unpack_from(">I", data)[0], data[4 : 4 + PUBLIC_BYTES], data[4 + PUBLIC_BYTES :])


@dataclass(frozen=True)
class EncryptedShare:
    sender: int
    receiver: int
    blob: bytes  # seal(share key, b-share || sk-share, (round, sender, receiver))

    SIZE = 8 + SEALED_BYTES

    def to_bytes(self) -> bytes:
        return struct.pack(">II", self.sender, self.receiver) + self.blob

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShare:
        if len(data) != cls.SIZE:
            raise MessageError(f"an encrypted share is {cls.SIZE} bytes, got {len(data)}")
        sender, receiver = struct.unpack_from(">II", data)
        return cls(sender, receiver, data[8:])


@dataclass(frozen=True)
class ShareKeysRequest:
    """The advertisements of the client's neighbours."""

    cid: int
    neighbours: tuple[Advertise, ...]

    def to_bytes(self) -> bytes:
        return struct.pack(">IH", self.cid, len(self.neighbours)) + b"".join(a.to_bytes() for a in self.neighbours)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeysRequest:
        cid, count = _head(">IH", data)
        return cls(cid, tuple(Advertise.from_bytes(r) for r in _records(data, 6, count, Advertise.SIZE)))


_S = TypeVar("_S", bound="_Shares")


@dataclass(frozen=True)
class _Shares:
    cid: int
    shares: tuple[EncryptedShare, ...]

    def to_bytes(self) -> bytes:
        return struct.pack(">IH", self.cid, len(self.shares)) + b"".join(s.to_bytes() for s in self.shares)

    @classmethod
    def from_bytes(cls: type[_S], data: bytes) -> _S:
        cid, count = _head(">IH", data)
        return cls(cid, tuple(EncryptedShare.from_bytes(r) for r in _records(data, 6, count, EncryptedShare.SIZE)))


class ShareKeysResponse(_Shares):
    """A client's encrypted shares, one per neighbour, for the coordinator to relay."""


class MaskedInputRequest(_Shares):
    """The encrypted shares addressed to this client (from neighbours that sent theirs)."""


@dataclass(frozen=True)
class MaskedInput:
    cid: int
    bits: int
    y: np.ndarray  # uint64 values below 2^bits

    def to_bytes(self) -> bytes:
        words = self.y.astype(f"<u{self.bits // 8}")
        return struct.pack(">IBI", self.cid, self.bits, len(self.y)) + words.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        cid, bits, d = _head(">IBI", data)
        if bits not in (8, 16, 32, 64) or len(data) != 9 + d * bits // 8:
            raise MessageError(f"a masked input of {d} {bits}-bit words cannot be {len(data)} bytes")
        return cls(cid, bits, np.frombuffer(data, dtype=f"<u{bits // 8}", offset=9).astype(np.uint64))


@dataclass(frozen=True)
class UnmaskRequest:
    """Which of the client's neighbours survived (reveal b-shares) and which dropped after
    sharing (reveal sk-shares)."""

    cid: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        n_s, n_d = len(self.survivors), len(self.dropped)
        return struct.pack(f">IHH{n_s + n_d}I", self.cid, n_s, n_d, *self.survivors, *self.dropped)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        cid, n_s, n_d = _head(">IHH", data)
        if len(data) != 8 + 4 * (n_s + n_d):
            raise MessageError("an unmask request's length does not match its counts")
        return cls(cid, _ids(data, 8, n_s), _ids(data, 8 + 4 * n_s, n_d))


@dataclass(frozen=True)
class UnmaskResponse:
    cid: int
    self_mask_shares: dict[int, bytes]  # survivor -> share of its b_u
    key_shares: dict[int, bytes]  # dropped client -> share of its s_sk

    def to_bytes(self) -> bytes:
        head = struct.pack(">IHH", self.cid, len(self.self_mask_shares), len(self.key_shares))
        body = [struct.pack(">I", v) + s for part in (self.self_mask_shares, self.key_shares) for v, s in part.items()]
        return head + b"".join(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        cid, n_s, n_k = _head(">IHH", data)
        recs = _records(data, 8, n_s + n_k, 4 + SHARE_BYTES)
        pairs = [(struct.unpack_from(">I", r)[0], r[4:]) for r in recs]
        return cls(cid, dict(pairs[:n_s]), dict(pairs[n_s:]))
