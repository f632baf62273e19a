"""Fast selection must return exactly the same sets as the naive methods."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcomp.compression.selection import DIRECT_LIMIT, positions, random_subset, top_magnitude


def _reference_top(x: torch.Tensor, k: int) -> set[int]:
    return set(torch.topk(x.abs(), k).indices.tolist())


@pytest.mark.parametrize("n", [DIRECT_LIMIT + 1, 1_000_003])
@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.05, 0.2])
def test_top_magnitude_matches_torch_topk_on_large_tensors(n: int, fraction: float) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen)  # heavy-ish tails
    k = max(1, int(fraction * n))
    got = top_magnitude(x, k, torch.Generator().manual_seed(1))
    assert got.numel() == k
    assert torch.all(got[1:] > got[:-1]), "positions come back ascending and distinct"
    assert set(got.tolist()) == _reference_top(x, k)


def test_top_magnitude_with_ties_returns_k_of_the_largest() -> None:
    # Many equal magnitudes around the cut: any choice among ties is a valid top-k.
    x = torch.cat([torch.full((300_000,), 1.0), torch.full((300_000,), -2.0), torch.zeros(400_000)])
    k = 450_000
    got = top_magnitude(x, k)
    assert got.numel() == k == torch.unique(got).numel()
    kept = x[got].abs()
    assert kept.min() >= x.abs().kthvalue(x.numel() - k + 1).values
    assert int((kept == 2.0).sum()) == 300_000


@given(n=st.integers(0, 300), k=st.integers(0, 300), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_top_magnitude_small_sizes(n: int, k: int, seed: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    got = top_magnitude(x, k)
    assert got.numel() == min(k, n)
    if 0 < k < n:
        assert x[got].abs().min() >= x.abs().topk(k).values.min()


@given(n=st.integers(1, 100_000), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_random_subset_is_k_distinct_sorted_positions(n: int, frac: float, seed: int) -> None:
    k = int(frac * n)
    got = random_subset(n, k, torch.Generator().manual_seed(seed))
    assert got.numel() == k
    if k:
        assert got.min() >= 0 and got.max() < n
        assert torch.all(got[1:] > got[:-1])


@pytest.mark.parametrize("n,k", [(10, 3), (20_000, 5)])
def test_random_subset_is_uniform(n: int, k: int) -> None:
    """Every position is picked with probability k / n (chi-square style bound)."""
    trials = 4000 if n == 10 else 20_000
    gen = torch.Generator().manual_seed(7)
    counts = torch.zeros(n)
    for _ in range(trials):
        counts[random_subset(n, k, gen)] += 1
    expected = trials * k / n
    if n == 10:
        assert torch.all((counts - expected).abs() < 5 * expected**0.5)
    else:  # too many cells to bound each: bound the spread instead
        z = (counts - expected) / expected**0.5
        assert abs(float(z.mean())) < 0.05 and 0.9 < float(z.std()) < 1.1


@given(n=st.integers(0, 5000), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
@settings(max_examples=80, deadline=None)
def test_positions_match_torch_nonzero(n: int, density: float, seed: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < density
    got = positions(mask)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.nonzero(mask).squeeze(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_top_magnitude_other_dtypes_and_strided_input(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2 * (DIRECT_LIMIT + 5000), generator=gen).to(dtype)
    x = base[::2]  # a strided view: selection must follow its logical order
    k = x.numel() // 50
    got = top_magnitude(x, k, torch.Generator().manual_seed(1))
    assert got.numel() == k and torch.all(got[1:] > got[:-1])
    # Ties are common in 16-bit types: compare the kept magnitudes, not the positions.
    assert x.abs()[got].float().min() >= x.abs().float().topk(k).values.min()
