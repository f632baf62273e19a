"""The state of a federated round, what a client is told to do, and the read-only view of the open round.

`RoundState` is the coordinator's own (mutated under its lock); `OpenRound` is the documented,
immutable view others (the simulation engine, tests) read it through.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gradcomp.server.accounting import round_sample_rate
from gradcomp.server.updates import Params

RUNNING, FINISHED, BUDGET_EXHAUSTED, FAILED = "running", "finished", "budget_exhausted", "failed"


@dataclass(frozen=True)
class Task:
    """What a client should do now."""

    action: str  # "wait" | "train" | "done"
    round: int = 0
    model_version: int = 0
    retry_after: float = 0.5
    deadline_in: float = 0.0
    message: str = ""


@dataclass
class RoundState:
    number: int
    attempt: int
    selected: set[str]
    started_at: float
    deadline: float
    received: dict[str, tuple[int, Params]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    uplink_bytes: int = 0
    dense_bytes: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    clipped: int = 0  # accepted updates scaled down to limits.max_update_norm
    missed: set[str] = field(default_factory=set)  # selected in an earlier attempt, delivered nothing
    sampling: list[tuple[int, int]] = field(default_factory=list)  # per attempt: (clients asked, pool size)

    @property
    def sample_rate(self) -> float:
        """The q this round is charged at, over all its attempts (`accounting.round_sample_rate`)."""
        return round_sample_rate(self.sampling)

    def view(self) -> OpenRound:
        return OpenRound(self.number, self.attempt, frozenset(self.selected), self.deadline, frozenset(self.received))


@dataclass(frozen=True)
class OpenRound:
    """A consistent snapshot of the open round: its number, attempt, who is asked, when it closes,
    and whose updates it holds."""

    number: int
    attempt: int
    selected: frozenset[str]
    deadline: float
    received: frozenset[str]


@dataclass(frozen=True)
class RoundResult:
    round: int
    entry: dict[str, Any]  # the round-log entry (also in coord.log)


def submit_refusal(
    r: RoundState | None, version: int, name: str, round_id: int, model_version: int | None
) -> tuple[str, str] | None:
    """(reason, message) refusing `name`'s update for `round_id` trained on `model_version`, or None."""
    if r is None or round_id != r.number:
        open_ = f"round {r.number} is open" if r else f"no round is open (next is {version + 1})"
        return "stale_round", f"update for round {round_id} but {open_}"
    if model_version is not None and model_version != version:
        return "stale_round", f"update trained on model v{model_version}; round {round_id} hands out v{version}"
    if name not in r.selected:
        return "not_selected", f"client {name!r} was not selected for round {r.number}"
    if name in r.received or name in r.pending:
        return "duplicate", f"client {name!r} already submitted for round {r.number}"
    return None
