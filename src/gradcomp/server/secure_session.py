"""One attempt of a secure-aggregation round over gRPC: a `SecAggServer` driven by the `SecAgg` RPC.

The attempt's clients are the round's selected clients, numbered in name order; its SecAgg+ round id
is fresh random bytes, so a retried attempt, or a round restarted after a coordinator crash, never
reuses a mask (every client also draws new keys and a new self-mask seed per attempt).

Phases close when every client still in the attempt answered, or at their deadline: the round's
`deadline_seconds` is split, ADVERTISE_SHARE of it for training and advertising (measured from the
round's start) and LATER_SHARE for each later phase (measured from when it opens, never past the
round's deadline). Whoever has not answered when a phase closes has dropped; the state machine
unmasks around it or aborts the attempt before any unmasking request goes out.

What one client can make the coordinator hold is bounded by its own share: one message per phase,
each refused unless its size is the one its phase allows (`max_bytes`), with INVALID_ARGUMENT for
bytes that do not decode or name another client, FAILED_PRECONDITION for a phase that is not open
and ALREADY_EXISTS for a second answer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcomp import metrics
from gradcomp.secagg.messages import (
    Advertise,
    EncryptedShare,
    MaskedInput,
    MessageError,
    ShareKeysResponse,
    UnmaskResponse,
)
from gradcomp.secagg.plan import SecurePlan
from gradcomp.secagg.server import RoundAborted, SecAggServer
from gradcomp.secagg.shamir import SHARE_BYTES

ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK, DONE = 1, 2, 3, 4, 5
PHASE_NAMES = {ADVERTISE: "advertise", SHARE_KEYS: "share", MASKED_INPUT: "masked", UNMASK: "unmask"}
ANSWERS: dict[int, Any] = {
    ADVERTISE: Advertise, SHARE_KEYS: ShareKeysResponse, MASKED_INPUT: MaskedInput, UNMASK: UnmaskResponse,
}  # fmt: skip
ADVERTISE_SHARE, LATER_SHARE = 0.55, 0.15
POLL_SECONDS = 0.1  # how soon a waiting client asks again

WAIT, READY, DROPPED, ABORTED = "wait", "ready", "dropped", "aborted"


class StepRefused(Exception):
    """A SecAgg request the coordinator refuses; `code` is "invalid", "precondition" or "exists"."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Reply:
    state: str
    message: bytes = b""
    retry_after: float = 0.0
    detail: str = ""


def max_bytes(phase: int, plan: SecurePlan) -> int:
    """The largest answer a client may send in `phase` (the masked input's size is exact)."""
    k = plan.params.degree
    return {
        ADVERTISE: Advertise.SIZE,
        SHARE_KEYS: 6 + k * EncryptedShare.SIZE,
        MASKED_INPUT: 9 + plan.dim * plan.params.bits // 8,
        UNMASK: 8 + k * (4 + SHARE_BYTES),
    }[phase]


class SecureSession:
    """One attempt (round `number`, attempt `attempt`) of a secure round; thread-safe."""

    def __init__(self, plan: SecurePlan, number: int, attempt: int, selected: Sequence[str], started: float,
                 deadline: float, clock: Callable[[], float]):  # fmt: skip
        self.plan, self.number, self.attempt, self.clock = plan, number, attempt, clock
        self.session = os.urandom(16)
        self.ids = {name: i for i, name in enumerate(sorted(selected))}
        self.names = {i: name for name, i in self.ids.items()}
        self.server = SecAggServer(plan.params, b"gradcomp-secagg/" + self.session, plan.dim, os.urandom(32))
        self.phase, self.opened = ADVERTISE, started
        self.span, self.deadline = deadline - started, deadline
        self.ends = started + ADVERTISE_SHARE * self.span
        self.expected: set[int] = set(self.names)
        self.got: dict[int, Any] = {}
        self.requests: dict[int, dict[int, bytes]] = {}
        self.uplink = 0
        self.aborted: str | None = None
        self.total: np.ndarray | None = None
        self.survivors: list[str] = []
        self.recovered = 0  # clients that dropped after sharing and were unmasked around
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self.aborted is not None or self.phase == DONE

    def may_train(self, name: str) -> bool:
        """Whether `name` is still to train and advertise in this attempt."""
        with self._lock:
            self._advance()
            cid = self.ids.get(name)
            return cid is not None and self.phase == ADVERTISE and not self.finished and cid not in self.got

    # --- client steps -------------------------------------------------------------------------
    def answer(self, name: str, phase: int, data: bytes) -> Reply:
        """Take `name`'s answer for `phase` (see module docstring for the refusals)."""
        with self._lock:
            self._advance()
            cid = self._member(name, phase)
            if self.aborted is not None:
                return Reply(ABORTED, detail=self.aborted)
            if phase != self.phase:
                state = "over" if phase < self.phase else "not open yet"
                raise StepRefused("precondition", f"SecAgg phase {PHASE_NAMES[phase]} is {state}")
            if cid not in self.expected:
                return Reply(DROPPED, detail=f"client {name!r} missed an earlier phase")
            if cid in self.got:
                raise StepRefused("exists", f"client {name!r} already answered phase {PHASE_NAMES[phase]}")
            self.got[cid] = self._decode(cid, phase, data)
            self.uplink += len(data)
            self._advance()
            return Reply(READY)

    def poll(self, name: str, phase: int) -> Reply:
        """The coordinator's request of `phase` for `name`, once that phase is open."""
        with self._lock:
            self._advance()
            cid = self._member(name, phase)
            if phase == ADVERTISE:
                raise StepRefused("invalid", "the advertise phase has no request to fetch; send the advertisement")
            if self.aborted is not None:
                return Reply(ABORTED, detail=self.aborted)
            if phase > self.phase:
                return Reply(WAIT, retry_after=POLL_SECONDS)
            request = self.requests.get(phase, {}).get(cid)
            if request is None:
                return Reply(DROPPED, detail=f"client {name!r} is not in phase {PHASE_NAMES[phase]}")
            return Reply(READY, request)

    def _member(self, name: str, phase: int) -> int:
        if phase not in PHASE_NAMES:
            raise StepRefused("invalid", f"unknown SecAgg phase {phase}")
        cid = self.ids.get(name)
        if cid is None:
            raise StepRefused(
                "precondition", f"client {name!r} is not in attempt {self.attempt} of round {self.number}"
            )
        return cid

    def _decode(self, cid: int, phase: int, data: bytes) -> Any:
        limit = max_bytes(phase, self.plan)
        if len(data) > limit or (phase == MASKED_INPUT and len(data) != limit):
            raise StepRefused("invalid", f"a {PHASE_NAMES[phase]} message of {len(data)} bytes; this round allows "
                              f"{limit}")  # fmt: skip
        try:
            msg = ANSWERS[phase].from_bytes(data)
        except MessageError as err:
            raise StepRefused("invalid", f"a malformed {PHASE_NAMES[phase]} message: {err}") from None
        if msg.cid != cid:
            raise StepRefused("invalid", f"a {PHASE_NAMES[phase]} message names client {msg.cid}, not {cid}")
        if phase == MASKED_INPUT and msg.bits != self.plan.params.bits:
            raise StepRefused("invalid", f"a masked input in {msg.bits} bits; the ring has {self.plan.params.bits}")
        if phase == SHARE_KEYS and sorted(s.receiver for s in msg.shares) != sorted(self.server.graph[cid]):
            raise StepRefused("invalid", "shares that are not one per neighbour")
        if phase == SHARE_KEYS and any(s.sender != cid for s in msg.shares):
            raise StepRefused("invalid", "a share whose sender is another client")
        return msg

    # --- phases ---------------------------------------------------------------------------------
    def advance(self) -> None:
        """Close the open phase if everyone answered or its deadline passed (also called on every step)."""
        with self._lock:
            self._advance()

    def _advance(self) -> None:
        while not self.finished and (self.expected <= set(self.got) or self.clock() >= self.ends):
            self._close_phase()

    def _close_phase(self) -> None:
        now, phase = self.clock(), self.phase
        metrics.FED_SECAGG_PHASE_SECONDS.labels(phase=PHASE_NAMES[phase]).observe(max(0.0, now - self.opened))
        got, self.got = list(self.got.values()), {}
        try:
            if phase == UNMASK:
                self._unmask(got)
                return
            collectors: dict[int, Callable[[list[Any]], dict[int, Any]]] = {
                ADVERTISE: self.server.collect_advertise,
                SHARE_KEYS: self.server.collect_shares,
                MASKED_INPUT: self.server.collect_masked,
            }
            step = collectors[phase]
            out = step(got)
        except RoundAborted as err:
            self.aborted = f"round {self.number} attempt {self.attempt}: {err}"
            metrics.FED_SECAGG_ABORTED.inc()
            return
        self.phase += 1
        self.requests[self.phase] = {cid: req.to_bytes() for cid, req in out.items()}
        self.expected, self.opened = set(out), now
        self.ends = min(self.deadline, now + LATER_SHARE * self.span)

    def _unmask(self, responses: list[UnmaskResponse]) -> None:
        t0 = time.perf_counter()
        self.total = self.server.finish(responses)
        metrics.FED_SECAGG_UNMASK_SECONDS.observe(time.perf_counter() - t0)
        self.survivors = [self.names[c] for c in sorted(self.server.survivors)]
        self.recovered = len(self.server.dropped)
        self.phase = DONE
