"""Partitioners: coverage, skew that follows alpha, reproducibility, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcomp.partition import PartitionError, parse_partition, partition, skew_summary
from gradcomp.tasks import load_task


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_task("digits-mlp").labels().numpy()


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.size == n, "sizes must add up to the dataset"
    assert np.unique(allidx).size == n, "no example may be given twice"
    assert all(p.dtype == np.int32 for p in parts)
    assert all(p.size >= 1 for p in parts), "every client needs at least one example"


@pytest.mark.parametrize(
    "spec", ["iid", "dirichlet(alpha=0.1)", "dirichlet(alpha=0.5)", "dirichlet(100)", "shards(k=2)"]
)
@pytest.mark.parametrize("clients", [1, 10, 100])
def test_sizes_add_up(labels: np.ndarray, spec: str, clients: int) -> None:
    parts = partition(labels, clients, spec, seed=3)
    assert len(parts) == clients
    _check_cover(parts, labels.size)


@given(
    n=st.integers(20, 400),
    clients=st.integers(1, 20),
    classes=st.integers(1, 12),
    alpha=st.floats(0.01, 50),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=60, deadline=None)
def test_dirichlet_covers_any_input(n: int, clients: int, classes: int, alpha: float, seed: int) -> None:
    y = np.random.default_rng(seed).integers(0, classes, size=n)
    _check_cover(partition(y, clients, f"dirichlet(alpha={alpha})", seed=seed), n)


def test_dirichlet_skew_grows_as_alpha_falls(labels: np.ndarray) -> None:
    skews = []
    for alpha in (100.0, 1.0, 0.3, 0.05):
        # average over seeds so the ordering is a property of alpha, not of one draw
        tv = [
            skew_summary(labels, partition(labels, 50, f"dirichlet({alpha})", seed=s)).tv_distance_mean
            for s in range(3)
        ]
        skews.append(float(np.mean(tv)))
    assert skews == sorted(skews), f"label skew should rise as alpha falls: {skews}"
    assert skews[-1] > 3 * skews[0]
    few = skew_summary(labels, partition(labels, 50, "dirichlet(0.05)", seed=0)).labels_per_client_mean
    many = skew_summary(labels, partition(labels, 50, "dirichlet(100)", seed=0)).labels_per_client_mean
    assert few < many


def test_shards_give_about_k_labels(labels: np.ndarray) -> None:
    s1 = skew_summary(labels, partition(labels, 100, "shards(k=1)", seed=0))
    s2 = skew_summary(labels, partition(labels, 100, "shards(k=2)", seed=0))
    iid = skew_summary(labels, partition(labels, 100, "iid", seed=0))
    assert s1.labels_per_client_max <= 2  # a shard can straddle one label boundary
    assert 1.5 <= s2.labels_per_client_mean <= 3
    assert s1.tv_distance_mean > s2.tv_distance_mean > iid.tv_distance_mean


@pytest.mark.parametrize("spec", ["iid", "dirichlet(alpha=0.5)", "shards(k=2)"])
def test_deterministic_by_seed(labels: np.ndarray, spec: str) -> None:
    a = partition(labels, 30, spec, seed=7)
    b = partition(labels, 30, spec, seed=7)
    c = partition(labels, 30, spec, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_parse_and_errors(labels: np.ndarray) -> None:
    assert str(parse_partition("dirichlet(0.5)")) == "dirichlet(alpha=0.5)"
    assert str(parse_partition("shards(k=3)")) == "shards(k=3)"
    assert str(parse_partition(" iid ")) == "iid"
    for bad, words in [
        ("dirichlet(alpha=0)", "positive"),
        ("dirichlet(beta=1)", "one argument 'alpha'"),
        ("shards(k=0)", ">= 1"),
        ("zipf(1)", "unknown partition"),
        ("dirichlet(x)", "must be a number"),
    ]:
        with pytest.raises(PartitionError, match=words):
            parse_partition(bad)
    with pytest.raises(PartitionError, match="each client needs one"):
        partition(labels[:5], 10, "iid")
    with pytest.raises(PartitionError, match="shards"):
        partition(labels[:50], 30, "shards(k=2)")


def test_summary_text(labels: np.ndarray) -> None:
    text = skew_summary(labels, partition(labels, 10, "iid", seed=0)).format("iid")
    assert "10 clients" in text and "label skew" in text and str(labels.size) in text


def test_natural_keeps_groups_whole(labels: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    groups = rng.zipf(1.5, labels.size) % 40  # 40-ish groups of very different sizes
    names = np.unique(groups)
    one_each = partition(labels, names.size, "natural", seed=0, groups=groups)
    assert sorted(np.unique(groups[p]).size for p in one_each) == [1] * names.size
    assert sorted(p.size for p in one_each) == sorted(np.bincount(groups)[names])
    fewer = partition(labels, 10, "natural", seed=0, groups=groups)
    assert np.array_equal(np.sort(np.concatenate(fewer)), np.arange(labels.size))
    owner = {}
    for c, p in enumerate(fewer):
        for g in np.unique(groups[p]):
            assert owner.setdefault(int(g), c) == c  # no group is split between clients
    assert str(parse_partition("natural")) == "natural"
    with pytest.raises(PartitionError, match="no natural groups"):
        partition(labels, 10, "natural")
    with pytest.raises(PartitionError, match="at most that many"):
        partition(labels, names.size + 1, "natural", groups=groups)
    with pytest.raises(PartitionError, match="takes no argument"):
        parse_partition("natural(2)")
