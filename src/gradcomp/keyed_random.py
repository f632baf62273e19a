"""Randomness only a key's holder can reproduce: keys, sub-keys and the noise streams of DP.

DP noise protects data only from an adversary who cannot regenerate it. A generator seeded
with an integer the adversary knows (the job seed every client receives) protects nothing
(`tests/test_noise_secrecy.py` regenerates such noise and recovers the clipped update), and a
secret integer seed is little better: torch's CPU generator
keeps 32 bits of any seed (`manual_seed(2**32 + 5)` draws what `manual_seed(5)` draws), few
enough to try them all against a noised value. So secret streams here are AES-256 in counter
mode under a 256-bit key: without the key the draws cannot be told from random, with it the
same draws come back (a resumed coordinator, a round a client redoes). Keys for separate uses
are derived with HMAC-SHA256 (`subkey`): one sub-key reveals neither its parent nor a sibling.

Not addressed: the floating-point artefacts of sampling Gaussians in finite precision
(Mironov 2012); the draws are float64 Box-Muller, cast to the tensor's dtype.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

Shape = tuple[int, ...] | torch.Size
Device = torch.device | str

KEY_BYTES = 32
_WORD = 8  # bytes per word; a uniform float uses 53 of its 64 bits
_BLOCK = 16  # AES block: the stream's position counts these


def new_key() -> bytes:
    """A fresh 256-bit key from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)


def check_key(key: bytes, what: str = "key") -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes, got {len(key) if isinstance(key, bytes) else type(key)}")
    return key


def subkey(key: bytes, *context: object) -> bytes:
    """HMAC-SHA256(key, context): the key of one use (and round, client, ...) under `key`.
    Context parts are joined with a separator no part may contain, so ("a/b",) and ("a", "b") differ."""
    parts = [str(c) for c in context]
    if any("\x1f" in p for p in parts):
        raise ValueError("a key context part may not contain the unit separator \\x1f")
    return hmac.new(check_key(key), "\x1f".join(parts).encode(), hashlib.sha256).digest()


class KeyedStream:
    """Uniform, Gaussian and Laplace draws from AES-256-CTR under `key`.

    `position` counts the 16-byte blocks used; `KeyedStream(key, s.position)` continues `s`.
    """

    def __init__(self, key: bytes, position: int = 0):
        self.key = check_key(key, "stream key")
        self.position = int(position)
        counter = self.position.to_bytes(_BLOCK, "big")
        self._cipher = Cipher(algorithms.AES(self.key), modes.CTR(counter)).encryptor()

    def words(self, n: int) -> np.ndarray:
        """`n` uniform uint64 words: the raw keystream, 8 bytes each."""
        words = n + n % 2  # whole blocks, so `position` stays exact
        raw = self._cipher.update(bytes(_WORD * words))
        self.position += words * _WORD // _BLOCK
        return np.frombuffer(raw, dtype="<u8")[:n]

    def integers_mod_pow2(self, n: int, bits: int) -> np.ndarray:
        """`n` uint64 draws, uniform on [0, 2^bits) exactly: 2^bits divides 2^64, so keeping a
        uniform word's low `bits` bits has no modulo bias (the masks of secure aggregation)."""
        if not 1 <= bits <= 64:
            raise ValueError(f"bits must be in 1..64, got {bits}")
        w = self.words(n)
        return w if bits == 64 else w & np.uint64((1 << bits) - 1)

    def uniform(self, n: int) -> np.ndarray:
        """`n` float64 draws, uniform on the open interval (0, 1) (2^53 equally spaced values)."""
        ints = self.words(n) >> np.uint64(11)
        return (ints.astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, shape: Shape, dtype: torch.dtype, device: Device) -> torch.Tensor:
        """Standard normal draws (Box-Muller on pairs of uniforms)."""
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = 2.0 * math.pi * u[pairs:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z).reshape(tuple(shape)).to(device=device, dtype=dtype)

    def laplace(self, shape: Shape, dtype: torch.dtype, device: Device) -> torch.Tensor:
        """Laplace(0, 1) draws (inverse CDF of a uniform)."""
        c = self.uniform(math.prod(shape)) - 0.5
        z = -np.sign(c) * np.log1p(-2.0 * np.abs(c))
        return torch.from_numpy(z).reshape(tuple(shape)).to(device=device, dtype=dtype)

    def noise(self, mechanism: str, like: torch.Tensor) -> torch.Tensor:
        """Unit-scale noise of `mechanism` ("gaussian" or "laplace") shaped like `like`."""
        draw = self.normal if mechanism == "gaussian" else self.laplace
        return draw(like.shape, like.dtype, like.device)
