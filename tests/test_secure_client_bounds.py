"""What a client holds a coordinator's secure-aggregation requests to (`client/secure_rounds.py`): the graph
settings, the session id, each relayed request's size for the degree, and the end of an attempt it is told
of. A hostile coordinator is played by the `call` function the client sends its SecAgg requests through."""

from __future__ import annotations

import numpy as np
import pytest

from gradcomp._proto import fed_pb2
from gradcomp.client.answers import ClientError
from gradcomp.client.secure_rounds import MAX_DEGREE, SecureRound, graph_params, take_part
from gradcomp.secagg.crypto import new_private, public_bytes
from gradcomp.secagg.messages import Advertise, ShareKeysRequest
from gradcomp.secagg.params import SecAggParams

Phase, State = fed_pb2.SecAggRequest, fed_pb2.SecAggResponse
PARAMS = SecAggParams(degree=4, threshold=3, min_survivors=4, bits=32)


def task(degree: int = 4, threshold: int = 3, session: bytes = b"s" * 16) -> fed_pb2.PullTaskResponse:
    t = fed_pb2.PullTaskResponse(round=1, secure_session=session, secure_id=0, deadline_seconds=1.0)
    t.config.secure.bits, t.config.secure.degree, t.config.secure.threshold = 32, degree, threshold
    t.config.secure.min_survivors = threshold + 1
    return t


def ads(count: int) -> bytes:
    keys = [public_bytes(new_private()) for _ in range(2 * count)]
    return ShareKeysRequest(0, tuple(Advertise(i + 1, keys[2 * i], keys[2 * i + 1]) for i in range(count))).to_bytes()


class Hostile:
    """A coordinator that accepts every answer and relays `share_request` when asked for the share phase."""

    def __init__(self, share_request: bytes, state: int = State.READY):
        self.share_request, self.state, self.asked = share_request, state, []

    def __call__(self, req: fed_pb2.SecAggRequest) -> fed_pb2.SecAggResponse:
        self.asked.append((req.phase, bool(req.message)))
        if req.message:
            return State(state=State.READY)
        return State(state=self.state, message=self.share_request, detail="x" * 10_000)


def test_graph_settings_outside_the_clients_bounds_are_refused() -> None:
    assert graph_params(task().config) == PARAMS
    with pytest.raises(ClientError, match="neighbours"):
        graph_params(task(degree=MAX_DEGREE + 2, threshold=MAX_DEGREE).config)
    with pytest.raises(ClientError, match="threshold"):  # t <= k/2: one view split would unmask a client
        graph_params(task(degree=4, threshold=2).config)
    with pytest.raises(ClientError, match="session"):
        SecureRound(Hostile(b""), task(session=b"s" * 65), PARAMS)
    with pytest.raises(ClientError, match="no secure input"):
        take_part(Hostile(b""), task(), None)


def test_an_oversized_relay_is_refused_before_it_is_parsed_and_nothing_more_is_sent() -> None:
    coord = Hostile(ads(5))  # five advertisements for a degree-4 client
    outcome = take_part(coord, task(), np.zeros(3, dtype=np.uint64))
    assert outcome.startswith("refused") and "at most with this degree" in outcome
    assert coord.asked == [(Phase.ADVERTISE, True), (Phase.SHARE_KEYS, False)]  # no shares went out


def test_an_honest_sized_relay_is_answered_and_an_aborted_attempt_ends_the_clients_part() -> None:
    coord = Hostile(ads(4))
    outcome = take_part(coord, task(), np.zeros(3, dtype=np.uint64))
    assert (Phase.SHARE_KEYS, True) in coord.asked  # it shared its keys with the four neighbours
    assert outcome.startswith("refused")  # then the same bytes are no masked-input request
    aborted = Hostile(b"", state=State.ABORTED)
    out = take_part(aborted, task(), np.zeros(3, dtype=np.uint64))
    assert out.startswith("aborted") and len(out) < 300  # the coordinator's detail is cut
