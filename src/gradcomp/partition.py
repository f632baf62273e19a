"""Split a training set across virtual clients: IID, Dirichlet(alpha) over labels,
pathological label shards, or natural (the task's own groups: a writer, a source module).

Every partitioner is a pure function of (labels, clients, its argument, seed), so a
simulation is reproducible and a sweep compares compressors on the same split. The
result is one compact int32 index array per client; `skew_summary` tells how non-IID
the split is, printed at the start of a simulation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from gradcomp.errors import GradcompError

KINDS = ("iid", "dirichlet", "shards", "natural")


class PartitionError(GradcompError, ValueError):
    """A partition that cannot be made (bad argument, more clients than examples, ...)."""


@dataclass(frozen=True)
class PartitionSpec:
    """Which partitioner and its one argument (alpha for dirichlet, k labels for shards)."""

    kind: str = "iid"
    alpha: float = 0.5
    k: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PartitionError(f"unknown partition {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind == "dirichlet" and not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise PartitionError(f"dirichlet: alpha must be a positive number, got {self.alpha}")
        if self.kind == "shards" and (isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1):
            raise PartitionError(f"shards: k (labels per client) must be an integer >= 1, got {self.k}")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet(alpha={self.alpha:g})"
        if self.kind == "shards":
            return f"shards(k={self.k})"
        return self.kind


_SPEC = re.compile(r"^\s*(\w+)\s*(?:\(\s*(?:(\w+)\s*=\s*)?([^)\s]*)\s*\))?\s*$")


def parse_partition(text: str | PartitionSpec) -> PartitionSpec:
    """`iid`, `dirichlet(0.5)` / `dirichlet(alpha=0.5)`, `shards(2)` / `shards(k=2)`."""
    if isinstance(text, PartitionSpec):
        return text
    m = _SPEC.match(str(text))
    if not m:
        raise PartitionError(f"cannot read partition {text!r}; e.g. iid, dirichlet(alpha=0.5), shards(k=2)")
    kind, name, value = m.group(1), m.group(2), m.group(3)
    if kind not in KINDS:
        raise PartitionError(f"unknown partition {kind!r}; use one of {', '.join(KINDS)}")
    if kind in ("iid", "natural"):
        if value:
            raise PartitionError(f"{kind} takes no argument")
        return PartitionSpec(kind)
    arg = {"dirichlet": "alpha", "shards": "k"}[kind]
    if name not in (None, arg):
        raise PartitionError(f"{kind} takes one argument {arg!r}, got {name!r}")
    if not value:
        return PartitionSpec(kind)
    try:
        number = float(value) if kind == "dirichlet" else int(value)
    except ValueError:
        raise PartitionError(f"{kind}: {arg} must be a number, got {value!r}") from None
    return PartitionSpec(kind, alpha=number) if kind == "dirichlet" else PartitionSpec(kind, k=int(number))


def partition(
    labels: np.ndarray, clients: int, spec: PartitionSpec | str, seed: int = 0, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """Index arrays (int32, sorted) for each client; together they cover every example once.
    `groups` (one integer per example) is what `natural` splits by."""
    spec = parse_partition(spec)
    labels = np.asarray(labels).reshape(-1)
    if clients < 1:
        raise PartitionError(f"clients must be >= 1, got {clients}")
    if clients > labels.size:
        raise PartitionError(f"{clients} clients but only {labels.size} examples: each client needs one")
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        parts = iid(labels.size, clients, rng)
    elif spec.kind == "dirichlet":
        parts = dirichlet(labels, clients, spec.alpha, rng)
    elif spec.kind == "natural":
        if groups is None:
            raise PartitionError("natural: the task names no natural groups (writers, modules); use iid or dirichlet")
        parts = natural(np.asarray(groups).reshape(-1), clients, rng)
    else:
        parts = shards(labels, clients, spec.k, rng)
    return [np.sort(p).astype(np.int32) for p in parts]


def iid(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into near-equal pieces."""
    return list(np.array_split(rng.permutation(n), clients))


def dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per label, split its examples across clients with proportions ~ Dir(alpha).

    Small alpha gives each client few labels (strong skew); large alpha tends to IID. A
    client left empty takes one example from the largest client, so every client can train.
    """
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        props = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(props)[:-1] * idx.size).round().astype(int)
        for c, piece in enumerate(np.split(idx, cuts)):
            parts[c].extend(piece.tolist())
    sizes = np.array([len(p) for p in parts])
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax([len(p) for p in parts]))
        parts[empty].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.asarray(p, dtype=np.int64) for p in parts]


def shards(labels: np.ndarray, clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into clients * k shards, deal k to each."""
    n_shards = clients * k
    if n_shards > labels.size:
        raise PartitionError(f"shards: {clients} clients x k={k} = {n_shards} shards > {labels.size} examples")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(clients, k)
    return [np.concatenate([pieces[s] for s in row]) for row in deal]


def natural(groups: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Whole groups per client: one each when there are as many clients as groups; fewer clients
    take several (largest group first to the client with fewest examples, ties in a seeded order),
    so no group is ever split and the skew of the task's own grouping is kept."""
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if clients > names.size:
        raise PartitionError(f"natural: {clients} clients but the task has {names.size} groups; use at most that many")
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(sizes)[:-1])
    order = sorted(range(names.size), key=lambda g: (-sizes[g], rng.random()))
    load = np.zeros(clients, dtype=np.int64)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for g in order:
        c = int(np.argmin(load))
        parts[c].append(members[g])
        load[c] += sizes[g]
    return [np.concatenate(p) for p in parts]


@dataclass(frozen=True)
class SkewSummary:
    """How non-IID a split is: sizes, labels per client, and distance from the global label mix."""

    clients: int
    examples: int
    size_min: int
    size_median: float
    size_max: int
    labels_per_client_mean: float
    labels_per_client_min: int
    labels_per_client_max: int
    tv_distance_mean: float  # mean total-variation distance of a client's label mix to the global one

    def format(self, spec: PartitionSpec | str = "") -> str:
        head = f"partition {spec}: " if spec else "partition: "
        return (
            f"{head}{self.clients} clients, {self.examples} examples; size min/median/max "
            f"{self.size_min}/{self.size_median:g}/{self.size_max}; labels per client mean "
            f"{self.labels_per_client_mean:.2f} (min {self.labels_per_client_min}, max "
            f"{self.labels_per_client_max}); label skew (mean TV distance to global) {self.tv_distance_mean:.3f}"
        )


def skew_summary(labels: np.ndarray, parts: list[np.ndarray]) -> SkewSummary:
    labels = np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    lookup = np.searchsorted(classes, labels)
    global_mix = np.bincount(lookup, minlength=classes.size) / labels.size
    sizes = np.array([p.size for p in parts])
    counts = np.stack([np.bincount(lookup[p], minlength=classes.size) for p in parts])
    present = (counts > 0).sum(axis=1)
    mixes = counts / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(mixes - global_mix).sum(axis=1)
    return SkewSummary(
        clients=len(parts),
        examples=int(sizes.sum()),
        size_min=int(sizes.min()),
        size_median=float(np.median(sizes)),
        size_max=int(sizes.max()),
        labels_per_client_mean=float(present.mean()),
        labels_per_client_min=int(present.min()),
        labels_per_client_max=int(present.max()),
        tv_distance_mean=float(tv.mean()),
    )
