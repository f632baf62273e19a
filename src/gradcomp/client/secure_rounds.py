"""A client's side of a secure-aggregation round over gRPC: its `SecAggClient` through the four phases.

The coordinator relays and sums; everything it sends is held to bounds before it is parsed: the graph
settings (`graph_params`: at most MAX_DEGREE neighbours, SecAgg+'s threshold rules), each request's
size (a share-keys request carries at most `degree` advertisements, a masked-input request at most
`degree` shares, an unmask request at most `degree` ids), the session id's length, and the time the
client waits for a phase (the task's deadline plus WAIT_GRACE, polls at most every MAX_RETRY seconds
and no more often than MIN_RETRY). The state machine then refuses any request that would help unmask
one client's input (`secagg/client.py`). A refused or malformed request ends the client's part in the
attempt; it never answers a phase twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np

from gradcomp._proto import fed_pb2
from gradcomp.client.answers import ClientError
from gradcomp.secagg.client import ProtocolError, SecAggClient
from gradcomp.secagg.messages import (
    Advertise,
    EncryptedShare,
    MaskedInputRequest,
    MessageError,
    ShareKeysRequest,
    UnmaskRequest,
)
from gradcomp.secagg.params import SecAggParams

MAX_DEGREE = 1024  # neighbours a client shares with (each costs it one X25519 agreement and one seal)
MAX_SESSION_BYTES = 64
WAIT_GRACE = 10.0  # seconds past the task's deadline a client still waits for a phase
MIN_RETRY, MAX_RETRY = 0.02, 2.0
Phase = fed_pb2.SecAggRequest
State = fed_pb2.SecAggResponse


class RoundOver(Exception):
    """The client's part in this attempt ended without error (dropped, aborted, or the attempt is gone)."""


def graph_params(cfg: fed_pb2.TrainingConfig) -> SecAggParams:
    """The SecAgg+ settings of a training config, within the client's bounds."""
    s = cfg.secure
    if not 2 <= s.degree <= MAX_DEGREE:
        raise ClientError(
            f"secure aggregation with {s.degree} neighbours per client; this client takes 2..{MAX_DEGREE}"
        )
    try:
        return SecAggParams(degree=s.degree, threshold=s.threshold, min_survivors=s.min_survivors, bits=s.bits)
    except ValueError as err:
        raise ClientError(f"unusable secure-aggregation settings from the coordinator: {err}") from None


class SecureRound:
    """One attempt: `call(request)` sends a SecAggRequest; `on_phase(phase)` runs after each answer sent."""

    def __init__(
        self,
        call: Callable[[fed_pb2.SecAggRequest], fed_pb2.SecAggResponse],
        task: fed_pb2.PullTaskResponse,
        params: SecAggParams,
        on_phase: Callable[[int], None] | None = None,
    ):
        if not 0 < len(task.secure_session) <= MAX_SESSION_BYTES:
            raise ClientError(f"a secure task whose session id is {len(task.secure_session)} bytes")
        self.call, self.task, self.params, self.on_phase = call, task, params, on_phase
        self.state = SecAggClient(task.secure_id, params, b"gradcomp-secagg/" + task.secure_session)
        self.give_up = time.monotonic() + min(max(task.deadline_seconds, 0.0), 86_400.0) + WAIT_GRACE

    def run(self, x: np.ndarray) -> str:
        """Runs the phases with input `x`; "sent" when the unmasking shares went out, else why not."""
        k = self.params.degree
        try:
            self._send(Phase.ADVERTISE, self.state.advertise().to_bytes())
            req = ShareKeysRequest.from_bytes(self._fetch(Phase.SHARE_KEYS, 6 + k * Advertise.SIZE))
            self._send(Phase.SHARE_KEYS, self.state.share_keys(req).to_bytes())
            masked = MaskedInputRequest.from_bytes(self._fetch(Phase.MASKED_INPUT, 6 + k * EncryptedShare.SIZE))
            self._send(Phase.MASKED_INPUT, self.state.masked_input(masked, x).to_bytes())
            unmask = UnmaskRequest.from_bytes(self._fetch(Phase.UNMASK, 8 + 4 * k))
            self._send(Phase.UNMASK, self.state.unmask(unmask).to_bytes())
        except RoundOver as why:
            return str(why)
        except (ProtocolError, MessageError) as err:
            return f"refused: {err}"
        return "sent"

    def _request(self, phase: fed_pb2.SecAggRequest.Phase, message: bytes) -> fed_pb2.SecAggResponse:
        req = fed_pb2.SecAggRequest(round=self.task.round, session=self.task.secure_session, phase=phase,
                                    message=message)  # fmt: skip
        try:
            resp = self.call(req)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                raise RoundOver(f"over: {err.details()}") from None
            raise
        if resp.state in (State.DROPPED, State.ABORTED):
            raise RoundOver(f"{State.State.Name(resp.state).lower()}: {resp.detail[:200]}")
        return resp

    def _send(self, phase: fed_pb2.SecAggRequest.Phase, message: bytes) -> None:
        self._request(phase, message)
        if self.on_phase is not None:
            self.on_phase(phase)

    def _fetch(self, phase: fed_pb2.SecAggRequest.Phase, limit: int) -> bytes:
        """The coordinator's request of `phase`, polled for until the give-up time."""
        while True:
            resp = self._request(phase, b"")
            if resp.state == State.READY:
                if len(resp.message) > limit:
                    raise MessageError(f"a request of {len(resp.message)} bytes; {limit} at most with this degree")
                return resp.message
            if time.monotonic() > self.give_up:
                raise RoundOver(f"timed out waiting for phase {Phase.Phase.Name(phase)}")
            time.sleep(min(max(resp.retry_after_seconds, MIN_RETRY), MAX_RETRY))


def take_part(
    call: Callable[[fed_pb2.SecAggRequest], fed_pb2.SecAggResponse],
    task: fed_pb2.PullTaskResponse,
    x: np.ndarray | None,
    on_phase: Callable[[int], None] | None = None,
) -> str:
    """Runs the client's part of the secure attempt `task` names with input `x`; the outcome."""
    if x is None or not task.secure_session:
        raise ClientError(f"round {task.round}: a secure task without a session, or no secure input was built")
    return SecureRound(call, task, graph_params(task.config), on_phase).run(x)
