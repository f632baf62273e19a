"""Index selection for sparsifiers, fast on large tensors.

`torch.topk` over tens of millions of values is several times slower than a pass over
memory on a CPU. `top_magnitude` instead estimates a threshold from a small random
sample, keeps the (few) candidates above it in one pass, and runs the exact top-k on
those candidates only: the result is the exact top-k set, k entries, in about two
passes. It falls back to `torch.topk` when the estimate undershoots.
"""

from __future__ import annotations

import math

import torch

SAMPLE_SIZE = 1 << 15
# Below this size, or when k is a large fraction of n, plain topk is as fast.
DIRECT_LIMIT = 1 << 17
DIRECT_FRACTION = 0.2


def top_magnitude(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat int64 indices of the `k` largest |x| (ties broken arbitrarily), unsorted."""
    x = x.reshape(-1)
    n = x.numel()
    if k >= n:
        return torch.arange(n, device=x.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    a = x.abs()
    if n <= DIRECT_LIMIT or k > DIRECT_FRACTION * n:
        return torch.topk(a, k, sorted=False).indices
    s = min(SAMPLE_SIZE, n)
    sample = a[torch.randint(n, (s,), generator=generator, device=x.device)]
    # Aim for ~1.3k candidates plus four standard deviations of the sampling error.
    p = k / n
    keep = min(1.0, 1.3 * p + 4.0 * math.sqrt(p * (1 - p) / s))
    rank = max(1, s - math.ceil(keep * s))
    threshold = torch.kthvalue(sample, rank).values
    candidates = torch.nonzero(a >= threshold).squeeze(1)
    if candidates.numel() < k:
        return torch.topk(a, k, sorted=False).indices
    chosen = torch.topk(a[candidates], k, sorted=False).indices
    return candidates[chosen]


def random_subset(
    n: int, k: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`k` distinct positions of range(n), uniformly at random, sorted (int64).

    For k much smaller than n, draws with replacement and removes repeats (the distinct
    values of i.i.d. uniform draws form a uniform random subset), which avoids a
    permutation of all n positions.
    """
    if k >= n:
        return torch.arange(n, device=device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if 3 * k >= n:
        return torch.randperm(n, generator=generator, device=device)[:k].sort().values
    draws = k + k // 4 + 32
    while True:
        distinct = torch.unique(torch.randint(n, (draws,), generator=generator, device=device))
        if distinct.numel() >= k:
            break
        draws *= 2
    if distinct.numel() > k:
        pick = torch.randperm(distinct.numel(), generator=generator, device=device)[:k]
        distinct = distinct[pick].sort().values
    return distinct
