"""SecAgg+'s neighbourhood graph: a Harary ring over the round's clients in an order drawn from a
public seed, so every client has k neighbours (k/2 on each side) and the graph is k-connected:
removing fewer than k clients, dropped or colluding, cannot split the rest. The seed is public
(the coordinator picks it per round); what it protects against is a fixed layout an adversary
could plan around, not a coordinator that lies about the graph, which is out of scope here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import numpy as np

from gradcomp.keyed_random import KeyedStream, check_key


def neighbourhoods(ids: Iterable[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each client's neighbours. With at most degree + 1 clients the graph is complete."""
    nodes = sorted(set(ids))
    n = len(nodes)
    if n <= degree + 1:
        return {u: frozenset(v for v in nodes if v != u) for u in nodes}
    if degree % 2:
        raise ValueError(f"a ring graph needs an even degree, got {degree}")
    order = np.lexsort((np.array(nodes), KeyedStream(check_key(seed, "graph seed")).words(n)))
    ring = [nodes[i] for i in order]
    half = degree // 2
    return {ring[i]: frozenset(ring[(i + s) % n] for s in range(-half, half + 1) if s != 0) for i in range(n)}


def is_connected(nodes: Collection[int], graph: Mapping[int, Collection[int]]) -> bool:
    """Whether the graph restricted to `nodes` is connected (an empty set counts as not)."""
    keep = set(nodes)
    if not keep:
        return False
    start = next(iter(keep))
    seen, todo = {start}, [start]
    while todo:
        for v in graph[todo.pop()]:
            if v in keep and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == keep
