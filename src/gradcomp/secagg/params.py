"""The settings of one secure-aggregation round and the bounds they must meet.

- `degree` k: each client shares its secrets with, and masks against, k neighbours (SecAgg+:
  k = O(log n) instead of all n - 1). Even, because the neighbourhood graph is a ring on which
  each client links to k/2 clients on each side. With fewer than k + 1 clients the graph is
  complete.
- `threshold` t: shares needed to rebuild a secret. We enforce k/2 < t <= k. Why more than half:
  a coordinator can make a client u look dropped to some of its neighbours and alive to others
  (u's masked input simply arrives late for some). Those who think u alive reveal shares of its
  self-mask seed b_u, those who think it dropped reveal shares of its mask key s_sk; both secrets
  together unmask u's input alone. The two groups are disjoint subsets of u's k neighbours, so
  with 2t > k at most one group can reach t. With c colluding neighbours (who hand over shares of
  both) it takes 2t > k + c, so a deployment that fears both raises t. A coalition of an
  honest-but-curious coordinator (one survivor set for all) and at most t - 1 clients holds fewer
  than t shares of every honest client's secrets.
- `min_survivors`: the round aborts, before anyone reveals a share, when fewer clients sent their
  masked input. At least t + 1, since every survivor needs t surviving neighbours to rebuild b_u;
  so the coordinator never learns a sum of fewer than t + 1 updates.
- `bits` b: the ring Z_(2^b) of the masked sums. The masked vector is sent as b-bit words, so b is
  one of 8, 16, 32, 64; `quantise.check_no_wrap` says whether a sum of n clients fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WORD_BITS = (8, 16, 32, 64)


@dataclass(frozen=True)
class SecAggParams:
    degree: int
    threshold: int
    min_survivors: int
    bits: int = 32

    def __post_init__(self) -> None:
        k, t = self.degree, self.threshold
        if k < 2 or k % 2:
            raise ValueError(f"degree must be even and at least 2, got {k}")
        if not k < 2 * t <= 2 * k:
            raise ValueError(
                f"threshold must satisfy degree/2 < threshold <= degree ({k / 2:g} < t <= {k}), got {t}: "
                "at or below half, a coordinator that shows a client as dropped to some neighbours and "
                "alive to others could rebuild both its self-mask seed and its mask key"
            )
        if self.min_survivors < t + 1:
            raise ValueError(f"min_survivors must be at least threshold + 1 = {t + 1}, got {self.min_survivors}")
        if self.bits not in WORD_BITS:
            raise ValueError(f"bits must be one of {WORD_BITS} (the masked vector's word size), got {self.bits}")

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1


def log_degree(n: int, factor: float = 3.0) -> int:
    """An even degree of about factor * log2(n) (SecAgg+'s O(log n)), at most n - 1."""
    k = 2 * math.ceil(factor * math.log2(max(n, 2)) / 2)
    return max(2, min(k, (n - 1) // 2 * 2))


def short_of_threshold(degree: int, threshold: int, dropout: float) -> float:
    """P(fewer than `threshold` of `degree` neighbours survive) when each drops independently with
    probability `dropout`: the chance one client's secrets cannot be rebuilt."""
    keep = 1.0 - dropout
    return sum(math.comb(degree, j) * keep**j * dropout ** (degree - j) for j in range(threshold))


def settings_for(n: int, bits: int = 32, dropout: float = 0.0, failure: float = 0.01) -> SecAggParams:
    """Settings for rounds of about n clients: the smallest even degree at least `log_degree(n)` at
    which, with the smallest allowed t = k/2 + 1, a round aborts for lack of surviving holders with
    probability at most `failure` (union bound over the n clients, independent dropouts at rate
    `dropout`); a degree of n - 1 or more is the complete graph. min_survivors = t + 1.

    The degree stays O(log n) for a fixed dropout rate below 1/2 (the tail falls exponentially in k),
    but its constant grows fast with the rate: at 30% the complete graph is needed up to n of a few hundred.
    """
    if not 0.0 <= dropout < 0.5:
        raise ValueError(f"dropout must be in [0, 0.5) for t > k/2 to be reachable, got {dropout}")
    k = log_degree(n)
    while k < n - 1 and n * short_of_threshold(k, k // 2 + 1, dropout) > failure:
        k += 2
    k = max(k, 2)
    k += k % 2  # even; with k >= n - 1 the graph is complete and t = k/2 + 1 of its n - 1 holders
    return SecAggParams(degree=k, threshold=k // 2 + 1, min_survivors=k // 2 + 2, bits=bits)
