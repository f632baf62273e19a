"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

Written here rather than taken from a package: the candidates on the index either share only
16-byte secrets over GF(2^128) with bit-by-bit field multiplication in pure Python (pycryptodome's,
which would also add a second crypto library beside `cryptography`), or are small unmaintained
projects. One field element holds a whole 32-byte secret (an X25519 private key, a mask seed),
so a share is one 33-byte element and nothing is chunked.

Coefficients come from `secrets.randbelow` (the OS CSPRNG, exactly uniform on the field), so any
t-1 shares are independent of the secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = 2**256 + 297  # the smallest prime above 2^256: every 32-byte secret is a field element
SECRET_BYTES = 32
SHARE_BYTES = 33  # one field element, big-endian


class ShamirError(ValueError):
    """Too few shares, or shares that do not come from one secret of 32 bytes."""


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of `secret` at the points `xs` (distinct, in 1..PRIME-1); any `threshold` of them
    give the secret back, fewer give nothing."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    points = list(xs)
    if threshold < 1 or threshold > len(points):
        raise ShamirError(f"threshold {threshold} must be in 1..{len(points)} (the number of shares)")
    if len(set(points)) != len(points) or not all(0 < x < PRIME for x in points):
        raise ShamirError("share points must be distinct and in 1..PRIME-1")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in points}


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (point -> share); uses the first `threshold`."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares)[:threshold]
    ys = [_element(shares[x]) for x in points]
    value = 0
    for i, xi in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        value = (value + ys[i] * num * pow(den, -1, PRIME)) % PRIME
    if value >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("the shares do not come from one 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def _evaluate(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _element(share: bytes) -> int:
    if len(share) != SHARE_BYTES:
        raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
    y = int.from_bytes(share, "big")
    if y >= PRIME:
        raise ShamirError("a share is not a field element")
    return y
