"""Mask expansion in Z_(2^b), vectorised over numpy uint64.

A mask is a keyed AES-256-CTR stream (`KeyedStream.integers_mod_pow2`): never a 32-bit or
non-cryptographic generator. Sums run in uint64, whose wraparound is arithmetic mod 2^64; since
2^b divides 2^64, reducing the result mod 2^b (a bit mask) gives the sum in Z_(2^b) exactly, so
masks are added and subtracted without reducing after every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gradcomp.keyed_random import KeyedStream

_CHUNK = 1 << 15  # words per step: 256 KiB, whole AES blocks


def expand(key: bytes, dim: int, bits: int) -> np.ndarray:
    """The mask of `key`: `dim` uniform values in [0, 2^bits)."""
    return KeyedStream(key).integers_mod_pow2(dim, bits)


def reduce(values: np.ndarray, bits: int) -> np.ndarray:
    return values if bits == 64 else values & np.uint64((1 << bits) - 1)


def apply(acc: np.ndarray, plus: Iterable[bytes], minus: Iterable[bytes], bits: int) -> np.ndarray:
    """acc + sum(mask(k) for k in plus) - sum(mask(k) for k in minus), mod 2^bits; `acc` is updated
    in place when it is a writable uint64 array.

    The raw 64-bit words are added (their low `bits` bits are the masks, and the sum is reduced
    once at the end), a cache-sized chunk at a time across all streams: about twice as fast at
    d = 1e6 as expanding each whole mask, and the same words (chunks are whole AES blocks).
    """
    out = acc if acc.dtype == np.uint64 and acc.flags.writeable else acc.astype(np.uint64)
    streams = [(KeyedStream(k), True) for k in plus] + [(KeyedStream(k), False) for k in minus]
    for lo in range(0, len(out), _CHUNK):
        part = out[lo : lo + _CHUNK]
        for stream, add in streams:
            if add:
                part += stream.words(len(part))
            else:
                part -= stream.words(len(part))
    return reduce(out, bits)


def check_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """`values` as uint64 elements of Z_(2^bits); refuses anything outside [0, 2^bits)."""
    if values.ndim != 1 or values.dtype != np.uint64:
        raise ValueError(f"a ring vector is 1-d uint64, got {values.ndim}-d {values.dtype}")
    if bits < 64 and values.size and int(values.max()) >> bits:
        raise ValueError(f"a value is not below 2^{bits}")
    return values
