"""Key agreement and authenticated encryption of secure aggregation, all from `cryptography`.

X25519 agreement, then HKDF-SHA256 over the shared secret with a context naming the purpose,
the round and the two clients: a key for one use never serves another (the share key of u -> v
is not the key of v -> u, nor the pairwise mask key, nor any key of another round). Shares travel
under AES-256-GCM with associated data binding (round, sender, receiver), so a coordinator that
relays a ciphertext to another pair or into another round gets a decryption failure, not a share.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUBLIC_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_RAW = serialization.Encoding.Raw


class DecryptError(ValueError):
    """A ciphertext that does not open under its key and associated data."""


def new_private() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def context(purpose: str, round_id: bytes, first: int, second: int) -> bytes:
    """An unambiguous encoding of (purpose, round, client, client): length-prefixed strings."""
    p = purpose.encode()
    return (
        struct.pack(">H", len(p)) + p + struct.pack(">H", len(round_id)) + round_id + struct.pack(">II", first, second)
    )


def agree(own: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """32 bytes from X25519(own, peer) through HKDF-SHA256 under `info`. cryptography refuses a
    low-order peer key (an all-zero shared secret), so a forged public key cannot force a known key."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"gradcomp-secagg/" + info).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext) || tag. The nonce is random; each key seals one message."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, blob: bytes, associated: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag as e:
        raise DecryptError("a share does not open for this round, sender and receiver") from e
