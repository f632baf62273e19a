"""Index selection for sparsifiers, fast on large tensors.

`torch.topk` over tens of millions of values is several times slower than a pass over
memory on a CPU. `top_magnitude` instead:

1. estimates two thresholds from a small random sample of |x|: `lo`, which about
   k + margin values exceed, and `hi`, which about k - margin exceed (the margin is
   four standard deviations of the sampling error);
2. makes one pass over x in cache-sized chunks (abs, compare, nonzero per chunk)
   collecting the candidates >= lo;
3. keeps every candidate > hi (surely in the top k) and runs an exact top-k only on
   the narrow band [lo, hi] to fill up to exactly k.

The result is the exact top-k set (ties broken arbitrarily), sorted by position.
When a threshold estimate misses, it falls back to `torch.topk`, so it is never wrong.
"""

from __future__ import annotations

import math

import torch

# Sample for the threshold estimate: n / 64, within these bounds.
SAMPLE_MIN, SAMPLE_MAX = 1 << 13, 1 << 15
CHUNK = 1 << 20  # 4 MiB of float32: the chunk's abs and mask stay in cache
BLOCK_ROWS = 8  # column blocks of the prefilter in `_hits`
# ...used while at most this share of columns is expected to hold a hit (else plain compare).
PREFILTER_MAX_HIT = 0.15
# Below this size, or when k is a large fraction of n, plain topk is as fast.
DIRECT_LIMIT = 1 << 17
DIRECT_FRACTION = 0.25
# Below this many positions a permutation is cheaper than draws and masks.
SMALL_SUBSET = 4096


def _direct_top(a: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(a, k, sorted=False).indices.sort().values


def _candidates(x: torch.Tensor, lo: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (ascending) and magnitudes of every |x| >= lo, in one chunked pass.

    `density` is the expected fraction of hits; it decides whether the column prefilter pays.
    """
    if x.device.type != "cpu":
        a = x.abs()
        idx = torch.nonzero(a >= lo).squeeze(1)
        return idx, a[idx]
    n = x.numel()
    chunk = min(CHUNK, n)
    buf = torch.empty(chunk, dtype=x.dtype)
    threshold = float(lo)
    blocks = BLOCK_ROWS if density * BLOCK_ROWS <= PREFILTER_MAX_HIT else 1
    positions, magnitudes = [], []
    for start in range(0, n, chunk):
        part = x[start : start + chunk]
        b = buf[: part.numel()]
        torch.abs(part, out=b)
        hit, mag = _hits(b, threshold, blocks)
        magnitudes.append(mag)
        positions.append(hit.add_(start))
    return torch.cat(positions), torch.cat(magnitudes)


def _hits(b: torch.Tensor, threshold: float, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions and values of b >= threshold.

    Writing and scanning a boolean mask of the whole chunk is what costs most on a CPU, so the
    chunk is first viewed as `blocks` rows: the column maximum (a fast vectorised reduction)
    rules out most columns when hits are rare, and only the surviving columns are compared
    element by element. Row-major order of (row, column) hits is ascending position order.
    """
    if blocks == 1 or b.numel() % blocks:
        hit = torch.nonzero(b >= threshold).squeeze(1)
        return hit, b[hit]
    rows = b.view(blocks, -1)
    cols = torch.nonzero(rows.amax(0) >= threshold).squeeze(1)
    sub = rows[:, cols]
    r, c = torch.nonzero(sub >= threshold).unbind(1)
    return r * rows.shape[1] + cols[c], sub[r, c]


def top_magnitude(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat int64 positions of the `k` largest |x|, in ascending order."""
    x = x.reshape(-1)
    n = x.numel()
    if k >= n:
        return torch.arange(n, device=x.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if n <= DIRECT_LIMIT or k > DIRECT_FRACTION * n:
        return _direct_top(x.abs(), k)
    s = min(SAMPLE_MAX, max(SAMPLE_MIN, n // 64))
    sample = x[torch.randint(n, (s,), generator=generator, device=x.device)].abs()
    p = k / n
    margin = 4.0 * math.sqrt(p * (1 - p) / s) + 0.02 * p
    lo = torch.kthvalue(sample, max(1, s - math.ceil(min(1.0, p + margin) * s))).values
    hi_rank = s - math.floor(max(0.0, p - margin) * s)
    hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= s else None
    pos, mag = _candidates(x, lo, min(1.0, p + margin))
    if pos.numel() < k:  # the sample overestimated the threshold: rare, stay exact
        return _direct_top(x.abs(), k)
    keep = mag > hi if hi is not None else torch.zeros_like(mag, dtype=torch.bool)
    need = k - int(keep.sum())
    if need < 0:  # more than k above hi: the sample underestimated it
        return pos[_direct_top(mag, k)]
    if need:
        band = torch.nonzero(~keep).squeeze(1)
        keep[band[torch.topk(mag[band], need, sorted=False).indices]] = True
    return pos[torch.nonzero(keep).squeeze(1)]


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
        have = int(mask.sum())
        draws = max(32, 2 * (k - have))
    return torch.nonzero(mask).squeeze(1)


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
        return torch.nonzero(mask).squeeze(1)
    hits = _distinct_draws(n, k, generator, device)
    if hits.numel() > k:
        keep = torch.ones(hits.numel(), dtype=torch.bool, device=device)
        keep[random_subset(hits.numel(), hits.numel() - k, generator, device)] = False
        hits = hits[keep]
    return hits
