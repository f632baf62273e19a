"""The coordinator's secure rounds over gRPC: one `SecureSession` per attempt of the open round.

A session starts when a client first asks about the open round's attempt and is dropped when the
coordinator moves on (a retry opens a new attempt, so a new session with fresh randomness; a
coordinator restarted from its checkpoint has no session at all, and its clients' calls for the old
one are refused, so they pull a new task). When a session unmasks a sum it is released through
`Coordinator.accept_sum`; an aborted session releases nothing and the coordinator retries the round
at its deadline, as any round short of updates.
"""

from __future__ import annotations

import logging
import threading

from gradcomp import metrics
from gradcomp.server.core import Coordinator
from gradcomp.server.rounds import RoundResult
from gradcomp.server.secure_session import SecureSession, StepRefused
from gradcomp.server.updates import Rejected

log = logging.getLogger("gradcomp.server")


class SecureRounds:
    """Sessions of `coord`'s secure rounds (its `secure_plan` must be set)."""

    def __init__(self, coord: Coordinator):
        assert coord.secure_plan is not None
        self.coord, self.plan = coord, coord.secure_plan
        self.current: SecureSession | None = None
        self._released: set[bytes] = set()
        self._lock = threading.Lock()

    def session(self) -> SecureSession | None:
        """The session of the open round's attempt (made on first use), None between rounds."""
        r = self.coord.open_round()
        with self._lock:
            if r is None:
                self.current = None
                return None
            s = self.current
            if s is None or (s.number, s.attempt) != (r.number, r.attempt):
                started = r.deadline - self.coord.job.round.deadline_seconds
                s = self.current = SecureSession(self.plan, r.number, r.attempt, sorted(r.selected), started,
                                                 r.deadline, self.coord.clock)  # fmt: skip
            return s

    def lookup(self, session: bytes, round_id: int) -> SecureSession:
        """The session a client names; FAILED_PRECONDITION (StepRefused) when it is not the open one."""
        s = self.session()
        if s is None or s.session != session or s.number != round_id:
            raise StepRefused("precondition", f"secure round {round_id}: that attempt is over; pull a new task")
        return s

    def tick(self) -> RoundResult | None:
        """Close a phase whose deadline passed and release a finished sum (the round loop calls this:
        a phase must close even when no client is left to call)."""
        s = self.session()
        if s is None:
            return None
        s.advance()
        return self.settle(s)

    def settle(self, s: SecureSession) -> RoundResult | None:
        """Release the session's sum once (after it unmasked); a refused sum is logged, not raised."""
        with self._lock:
            if s.total is None or s.session in self._released:
                return None
            self._released.add(s.session)
        try:
            result = self.coord.accept_sum(s.number, s.survivors, s.total, s.uplink)
        except Rejected as err:
            log.warning("secure round %d: the unmasked sum was refused: %s", s.number, err)
            return None
        metrics.FED_SECAGG_DROPOUTS_RECOVERED.inc(s.recovered)
        return result
