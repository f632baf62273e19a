"""Benching of clients that are selected but do not deliver (a silent client must not stall rounds).

A client that heartbeats but never submits stays "connected", so plain selection keeps asking it
and every round waits out its deadline (or fails when `round.min_clients` needs it). `Bench`
counts, per client, the consecutive rounds it was selected for and ended without an accepted
update; after `round.bench_after_misses` of them the client is left out of selection for
`round.bench_rounds` rounds. `prefer` is the selection rule shared by new rounds and retries:
avoid the given clients unless the round cannot be filled without them, so benching never makes
a round impossible that would otherwise open.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def prefer(pool: Sequence[str], avoid: Iterable[str], need: int) -> list[str]:
    """The clients of `pool` not in `avoid`; the avoided ones too if fewer than `need` remain."""
    avoided = set(avoid)
    kept = [n for n in pool if n not in avoided]
    return kept if len(kept) >= need else list(pool)


class Bench:
    """Consecutive misses per client and the last round each benched client sits out."""

    def __init__(self, after_misses: int, rounds: int):
        self.after_misses = after_misses
        self.rounds = rounds
        self.misses: dict[str, int] = {}
        self.until: dict[str, int] = {}  # client -> last round number it is benched for

    def benched(self, round_number: int) -> set[str]:
        """Clients not to offer for round `round_number`."""
        return {n for n, last in self.until.items() if round_number <= last}

    def record(self, round_number: int, selected: Iterable[str], delivered: Iterable[str]) -> list[str]:
        """Close round `round_number`: reset who delivered, count a miss for who did not; the newly benched."""
        done = set(delivered)
        newly: list[str] = []
        for name in sorted(set(selected) - done):
            self.misses[name] = self.misses.get(name, 0) + 1
            if self.rounds and self.misses[name] >= self.after_misses:
                self.until[name] = round_number + self.rounds
                self.misses[name] = 0
                newly.append(name)
        for name in done:
            self.misses.pop(name, None)
        self.until = {n: last for n, last in self.until.items() if last > round_number}
        return newly

    def state_dict(self) -> dict[str, Any]:
        return {"misses": dict(self.misses), "benched_until": dict(self.until)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore from a checkpoint; one without bench state (older) starts everyone unbenched."""
        state = state or {}
        self.misses = {str(n): int(k) for n, k in state.get("misses", {}).items()}
        self.until = {str(n): int(r) for n, r in state.get("benched_until", {}).items()}
