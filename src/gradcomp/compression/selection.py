"""Index selection for sparsifiers, fast on large tensors.

`torch.topk` over tens of millions of values is several times slower than a pass over
memory on a CPU. `top_magnitude` instead:

1. estimates two thresholds from a small random sample of |x|: `lo`, which about
   k + margin values exceed, and `hi`, which about k - margin exceed (the margin is
   four standard deviations of the sampling error);
2. makes one pass over x in cache-sized chunks (abs, compare, nonzero per chunk, in
   numpy on the CPU) collecting the candidates >= lo;
3. keeps every candidate > hi (surely in the top k) and runs an exact top-k only on
   the narrow band [lo, hi] to fill up to exactly k.

The result is the exact top-k set (ties broken arbitrarily), sorted by position.
When a threshold estimate misses, it falls back to `torch.topk`, so it is never wrong.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Sample for the threshold estimate: n / 64, within these bounds.
SAMPLE_MIN, SAMPLE_MAX = 1 << 13, 1 << 15
CHUNK = 1 << 18  # 1 MiB of float32: the chunk's magnitudes and mask stay in cache
_NUMPY_FLOATS = (torch.float32, torch.float64)
# Below this size, or when k is a large fraction of n, plain topk is as fast.
DIRECT_LIMIT = 1 << 17
DIRECT_FRACTION = 0.25
# Below this many positions a permutation is cheaper than draws and masks.
SMALL_SUBSET = 4096


def _flatnonzero(mask: np.ndarray) -> np.ndarray:
    """`np.flatnonzero` of a 1-D bool array, about 2x faster when True is rare.

    numpy takes a branchy loop below ~10% density, which mispredicts on scattered hits.
    Looking at 4-byte words first makes both steps dense enough for its branchless loop:
    which words hold a hit, then which bytes of those words.
    """
    mask = np.ascontiguousarray(mask)
    body = mask.size - mask.size % 4
    words = mask[:body].view(np.uint32)
    hit_words = np.flatnonzero(words != 0)
    j = np.flatnonzero(words[hit_words].view(np.bool_))
    found = (hit_words[j >> 2] << 2) | (j & 3)
    if body == mask.size:
        return found
    return np.concatenate([found, np.flatnonzero(mask[body:]) + body])


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending positions (int64) of the True entries of a 1-D bool tensor.

    On the CPU this is numpy's, 2-5x faster than `torch.nonzero` on one thread.
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(_flatnonzero(mask.numpy()))
    return torch.nonzero(mask).squeeze(1)


def _direct_top(a: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(a, k, sorted=False).indices.sort().values


def _thresholds(x: torch.Tensor, k: int, generator: torch.Generator | None) -> tuple[float, float | None]:
    """(lo, hi) from a random sample of |x|: about k + margin values are >= lo, k - margin > hi.

    hi is None when the margin reaches past the largest sampled value.
    """
    n = x.numel()
    s = min(SAMPLE_MAX, max(SAMPLE_MIN, n // 64))
    sample = x[torch.randint(n, (s,), generator=generator, device=x.device)].abs()
    p = k / n
    margin = 4.0 * math.sqrt(p * (1 - p) / s) + 0.02 * p
    lo = torch.kthvalue(sample, max(1, s - math.ceil(min(1.0, p + margin) * s))).values
    hi_rank = s - math.floor(max(0.0, p - margin) * s)
    hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= s else None
    return float(lo), None if hi is None else float(hi)


def _candidates(values: np.ndarray, lo: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (ascending) and magnitudes of every |value| >= lo, in one chunked pass.

    numpy, not torch: on the CPU torch's boolean compare and nonzero are not vectorised
    (0.7 and 1+ ns per value on one thread), numpy's are several times faster.
    """
    n = values.size
    chunk = min(CHUNK, n)
    mag = np.empty(chunk, dtype=values.dtype)
    hit = np.empty(chunk, dtype=np.bool_)
    threshold = values.dtype.type(lo)
    where, magnitudes = [], []
    for start in range(0, n, chunk):
        part = values[start : start + chunk]
        m, h = mag[: part.size], hit[: part.size]
        np.abs(part, out=m)
        np.greater_equal(m, threshold, out=h)
        found = _flatnonzero(h)
        magnitudes.append(m[found])
        found += start
        where.append(found)
    return np.concatenate(where), np.concatenate(magnitudes)


def top_magnitude(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat int64 positions of the `k` largest |x|, in ascending order.

    Off the CPU this is `torch.topk`: a GPU's radix select is already fast.
    """
    x = x.detach().reshape(-1)
    n = x.numel()
    if k >= n:
        return torch.arange(n, device=x.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if x.device.type != "cpu" or n <= DIRECT_LIMIT or k > DIRECT_FRACTION * n:
        return _direct_top(x.abs(), k)
    if x.dtype not in _NUMPY_FLOATS:  # fp16/bf16: float32 holds them exactly, same order
        x = x.float()
    lo, hi = _thresholds(x, k, generator)
    pos, mag = _candidates(x.numpy(), lo)
    if pos.size < k:  # the sample overestimated the threshold: rare, stay exact
        return _direct_top(x.abs(), k)
    keep = mag > hi if hi is not None else np.zeros(mag.size, dtype=np.bool_)
    need = k - int(np.count_nonzero(keep))
    if need < 0:  # more than k above hi: the sample underestimated it
        return torch.from_numpy(pos)[_direct_top(torch.from_numpy(mag), k)]
    if need:  # fill up from the band [lo, hi] with its `need` largest
        band = _flatnonzero(~keep)
        keep[band[np.argpartition(mag[band], band.size - need)[band.size - need :]]] = True
    return torch.from_numpy(pos[keep])


def _distinct_draws(n: int, k: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """At least `k` distinct positions of range(n), ascending: the distinct values of i.i.d.
    uniform draws, which form a uniform random subset of their size."""
    if 16 * k < n:  # sparse: sort the draws, no O(n) mask
        draws = k + k // 8 + 64
        while True:
            hits = torch.unique(torch.randint(n, (draws,), generator=generator, device=device))
            if hits.numel() >= k:
                return hits
            draws *= 2
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    have, draws = 0, k + k // 4 + 32
    while have < k:
        mask[torch.randint(n, (draws,), generator=generator, device=device)] = True
        have = int(torch.count_nonzero(mask))
        draws = max(32, 2 * (k - have))
    return positions(mask)


def random_subset(
    n: int, k: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`k` distinct positions of range(n), uniformly at random, in ascending order (int64).

    Draws with replacement and keeps the distinct hits; a surplus is dropped by choosing
    the positions to drop the same way (recursively, on ever smaller ranges), so no
    permutation of all n positions is needed.
    """
    if k >= n:
        return torch.arange(n, device=device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if n <= SMALL_SUBSET:
        return torch.randperm(n, generator=generator, device=device)[:k].sort().values
    if 2 * k > n:  # choose the complement instead: fewer draws
        mask = torch.ones(n, dtype=torch.bool, device=device)
        mask[random_subset(n, n - k, generator, device)] = False
        return positions(mask)
    hits = _distinct_draws(n, k, generator, device)
    if hits.numel() > k:
        keep = torch.ones(hits.numel(), dtype=torch.bool, device=device)
        keep[random_subset(hits.numel(), hits.numel() - k, generator, device)] = False
        hits = hits.index_select(0, positions(keep))
    return hits
