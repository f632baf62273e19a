"""Who has joined a federated job, which shard each holds, and who counts as connected.

Not thread-safe on its own: the coordinator calls it under its lock. Shards follow the order of
the client names known at start (sorted), then strangers in the order they join, so a client gets
the same shard after a coordinator restart.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from gradcomp import metrics


@dataclass
class ClientInfo:
    name: str
    shard_index: int
    num_shards: int
    last_seen: float
    left: bool = False


class Membership:
    """The clients of one job: joins, heartbeats, leaves and liveness."""

    def __init__(self, expected: int, liveness_window: float, known_names: Iterable[str] = ()):
        self.clients: dict[str, ClientInfo] = {}
        self.expected = expected
        self.liveness_window = liveness_window
        names = sorted(known_names)
        self._known = len(names)
        self._shard_of: dict[str, int] = {}
        for i, n in enumerate(names):
            self._shard_of.setdefault(n, i)
        self._strangers = 0  # clients joined whose names were not known

    def _join(self, name: str, now: float) -> ClientInfo:
        index = self._shard_of.get(name)
        if index is None:
            index, self._strangers = self._known + self._strangers, self._strangers + 1
        shards = max(self.expected, self._known, index + 1)
        info = self.clients[name] = ClientInfo(name, index % shards, shards, now)
        return info

    def seen(self, names: Iterable[str], now: float) -> bool:
        """Mark clients alive at `now`, joining those not seen before; True when someone joined."""
        joined = False
        for name in names:
            info = self.clients.get(name)
            if info is None:
                info, joined = self._join(name, now), True
            info.last_seen, info.left = now, False
        return joined

    def leave(self, name: str) -> None:
        if name in self.clients:
            self.clients[name].left = True

    def has_left(self, name: str) -> bool:
        return name in self.clients and self.clients[name].left

    def live(self, now: float) -> Iterator[str]:
        """Clients that have not left and were heard from within the liveness window."""
        window = self.liveness_window
        return (n for n, c in self.clients.items() if not c.left and now - c.last_seen <= window)

    def has_members(self) -> bool:
        return any(not c.left for c in self.clients.values())


class _Counts(Protocol):
    def connected_count(self) -> int: ...


def gauge_connected(source: _Counts) -> None:
    """Point the connected-clients gauge at `source`, counted when scraped (always current; joins
    and heartbeats stay O(1)) and held weakly: a dropped coordinator reads as 0."""
    ref = weakref.ref(source)

    def count() -> float:
        alive = ref()
        return 0.0 if alive is None else float(alive.connected_count())

    metrics.FED_CLIENTS_CONNECTED.set_function(count)
