"""A client's input to secure aggregation: its update clipped, scaled, rounded, noised, in Z_(2^bits).

The encoding comes from the coordinator (`TrainingConfig.secure`), so a client holds it to bounds
before using it (`check_encoding`): a hostile coordinator must not make it allocate or loop without
limit, nor send its update with less noise than the job's privacy setting promised the client
(that floor is the client's own policy: `gradcomp client --require-dp` refuses sigma 0).

Rounding and noise come from keyed streams under the client's release key for the round
(`noisekey.release_key`): the coordinator, which sees only the noised sum, cannot regenerate them,
and a round the client redoes re-sends the same input (one release).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

import numpy as np

from gradcomp._proto import fed_pb2
from gradcomp.compression import Payload
from gradcomp.errors import GradcompError
from gradcomp.keyed_random import KeyedStream, subkey
from gradcomp.secagg.ddp import conditional_round
from gradcomp.secagg.plan import ClientEncoding
from gradcomp.secagg.quantise import clip_l2, to_ring

MAX_SCALED_CLIP = 2.0**40
MAX_SIGMA_PARTS = 2**62


class EncodingRefused(GradcompError, ValueError):
    """A secure encoding from the coordinator a client will not use."""


def encoding_from_pb(msg: fed_pb2.TrainingConfig) -> ClientEncoding | None:
    """The secure encoding a training config carries (None without secure aggregation), checked."""
    if not msg.HasField("secure"):
        return None
    s = msg.secure
    enc = ClientEncoding(int(s.bits), float(s.clip), float(s.scale), float(s.norm_bound), s.sigma_sq)
    check_encoding(enc)
    return enc


def check_encoding(enc: ClientEncoding) -> None:
    if enc.bits not in (32, 64):
        raise EncodingRefused(f"secure encoding bits must be 32 or 64, got {enc.bits}")
    for name in ("clip", "scale", "norm_bound"):
        v = getattr(enc, name)
        if not (math.isfinite(v) and v > 0):
            raise EncodingRefused(f"secure encoding {name} must be finite and above 0, got {v}")
    if enc.clip * enc.scale > MAX_SCALED_CLIP:
        raise EncodingRefused(f"secure encoding clip * scale {enc.clip * enc.scale:g} exceeds {MAX_SCALED_CLIP:g}")
    if enc.norm_bound < enc.clip * enc.scale:
        raise EncodingRefused("secure encoding norm_bound is below clip * scale: no rounding could meet it")
    try:
        sigma = Fraction(enc.sigma_sq)
    except (ValueError, ZeroDivisionError):
        raise EncodingRefused(f"secure encoding sigma_sq {enc.sigma_sq[:40]!r} is not a fraction") from None
    if sigma < 0 or max(abs(sigma.numerator), sigma.denominator) >= MAX_SIGMA_PARTS or 0 < sigma < Fraction(1, 4):
        raise EncodingRefused(f"secure encoding sigma_sq {enc.sigma_sq[:40]!r} is outside 0 or [1/4, 2^62)")


def secure_input(payloads: Mapping[str, Payload], enc: ClientEncoding, key: bytes) -> np.ndarray:
    """The payloads' values (the whole update, or the round's shared coordinates), in order, as the
    client's input: clipped to `clip`, scaled, conditionally rounded, noised, in Z_(2^bits)."""
    x = np.concatenate([p.values.double().numpy().ravel() for p in payloads.values()])
    if enc.norm_bound > enc.clip * enc.scale + math.sqrt(x.size) + 1:
        raise EncodingRefused("secure encoding norm_bound exceeds what rounding this update can need")
    q = conditional_round(clip_l2(x, enc.clip) * enc.scale, KeyedStream(subkey(key, "secagg-rounding")), enc.norm_bound)
    sigma = enc.noise_sigma_sq()
    if sigma:
        q = q + KeyedStream(subkey(key, "secagg-noise")).discrete_gaussian(q.size, sigma)
    return to_ring(q, enc.bits)
