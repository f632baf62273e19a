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

Continuous draws are float64 (Box-Muller; sign times an exponential for Laplace) whose tails come
from uniforms with full floating-point resolution near 0 (`exact_noise.uniform`), so they reach 37.6
(Gaussian) and 708 (Laplace) scales; `privacy.sampler_residual_delta` states the delta that reach still costs.
Not addressed for them: the rounding artefacts of sampling in finite precision (Mironov 2012) and the
cast to the tensor's dtype. `discrete_gaussian` / `discrete_laplace` have neither: their law is exact.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from fractions import Fraction

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gradcomp import exact_noise

Shape = tuple[int, ...] | torch.Size
Device = torch.device | str

KEY_BYTES = 32
_WORD = 8  # bytes per random word
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
        """`n` float64 draws on [2^-1022, 1) with full resolution near 0 (`exact_noise.uniform`)."""
        return exact_noise.uniform(self.words, n)

    def normal(self, shape: Shape, dtype: torch.dtype, device: Device) -> torch.Tensor:
        """Standard normal draws (Box-Muller on pairs of uniforms; |z| <= exact_noise.GAUSSIAN_REACH)."""
        n = math.prod(shape)
        pairs = (n + 1) // 2
        radius = np.sqrt(-2.0 * np.log(self.uniform(pairs)))  # the tail: full resolution near 0
        angle = (self.words(pairs) >> np.uint64(11)).astype(np.float64) * (2.0 * math.pi * 2.0**-53)
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z).reshape(tuple(shape)).to(device=device, dtype=dtype)

    def laplace(self, shape: Shape, dtype: torch.dtype, device: Device) -> torch.Tensor:
        """Laplace(0, 1) draws: a random sign times -log(uniform) (|z| <= exact_noise.LAPLACE_REACH).

        Not the inverse CDF of one uniform: that one's tail ends at 53 log 2 = 36.7 (the uniform's
        resolution near 1/2), this one's at 1022 log 2."""
        n = math.prod(shape)
        magnitude = -np.log(self.uniform(n))
        negative = np.unpackbits(self.words(-(-n // 64)).view(np.uint8))[:n].astype(bool)
        z = np.where(negative, -magnitude, magnitude)
        return torch.from_numpy(z).reshape(tuple(shape)).to(device=device, dtype=dtype)

    def noise(self, mechanism: str, like: torch.Tensor) -> torch.Tensor:
        """Unit-scale noise of `mechanism` ("gaussian" or "laplace") shaped like `like`."""
        draw = self.normal if mechanism == "gaussian" else self.laplace
        return draw(like.shape, like.dtype, like.device)

    def discrete_gaussian(self, n: int, sigma_sq: int | Fraction) -> np.ndarray:
        """`n` exact discrete Gaussian draws (int64): P(x) proportional to exp(-x^2 / (2 sigma_sq)), x in Z.

        `sigma_sq` is an int or a `fractions.Fraction` (floats are refused: their exact binary value
        is rarely meant). Canonne-Kamath-Steinke 2020 by rejection on exact integer comparisons of
        this stream's words, so the law is exactly the stated pmf (no rounding, no truncated tail);
        its variance is slightly below sigma_sq (`exact_noise.discrete_gaussian_variance`). The
        same key and position give the same draws; `position` afterwards continues the stream.
        """
        return exact_noise.discrete_gaussian(self.words, n, sigma_sq)

    def discrete_laplace(self, n: int, scale: int | Fraction) -> np.ndarray:
        """`n` exact discrete Laplace draws (int64): P(x) proportional to exp(-|x| / scale), x in Z."""
        return exact_noise.discrete_laplace(self.words, n, scale)
