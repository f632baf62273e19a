"""SecAgg+ rounds: exact sums under dropouts at every phase, aborts that reveal nothing, and the
client's refusals of requests that would unmask a single client."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp.secagg.client import Phase, ProtocolError, SecAggClient
from gradcomp.secagg.messages import (
    EncryptedShare,
    MaskedInput,
    MaskedInputRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
)
from gradcomp.secagg.params import SecAggParams
from gradcomp.secagg.server import RoundAborted, SecAggServer
from gradcomp.secagg.simulate import PHASES, run_round


@st.composite
def rounds(draw: st.DrawFn) -> tuple[SecAggParams, dict[int, np.ndarray], dict[int, int]]:
    k = draw(st.sampled_from([2, 4, 6]))
    t = draw(st.integers(k // 2 + 1, k))
    params = SecAggParams(k, t, draw(st.integers(t + 1, t + 3)), draw(st.sampled_from([8, 16, 32, 64])))
    ids = draw(st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=12, unique=True))
    dim = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inputs = {
        c: rng.integers(0, 2**params.bits, dim, dtype=np.uint64, endpoint=False)
        if params.bits < 64
        else rng.integers(0, 2**63, dim, dtype=np.uint64) * np.uint64(2)
        for c in ids
    }
    fate = st.one_of(st.just(len(PHASES)), st.integers(0, len(PHASES)))  # mostly finishing
    completes = {c: draw(fate) for c in ids}
    return params, inputs, completes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_a_round_gives_the_exact_modular_sum_of_the_survivors_or_aborts_revealing_nothing(case) -> None:
    params, inputs, completes = case
    report = run_round(inputs, params, completes)
    masked = {c for c in inputs if completes[c] >= 3}  # sent their masked input
    n = len(inputs)
    if all(v == len(PHASES) for v in completes.values()) and n >= params.min_survivors and n - 1 >= params.threshold:
        assert report.aborted is None  # nobody dropped: the round must finish
    if report.aborted is None:
        assert report.survivors == masked and len(masked) >= params.min_survivors
        expected = np.zeros_like(next(iter(inputs.values())))
        for c in masked:
            expected += inputs[c]
        expected &= np.uint64(params.modulus_mask)
        assert np.array_equal(report.total, expected)  # bit for bit
    else:
        assert report.total is None
        if len(masked) < params.min_survivors or all(v != 3 for v in completes.values()):
            assert report.unmask_requests == 0 and not report.revealed_self | report.revealed_key
    # never both secrets of one client, whatever happened
    assert not report.revealed_self & report.revealed_key
    assert report.revealed_key <= {c for c in inputs if completes[c] == 2}  # keys only of clients that dropped


def test_a_full_round_with_no_dropout_completes_and_counts_bytes() -> None:
    params = SecAggParams(degree=4, threshold=3, min_survivors=4, bits=32)
    inputs = {c: np.full(1000, c, dtype=np.uint64) for c in range(10)}
    report = run_round(inputs, params)
    assert report.aborted is None and np.array_equal(report.total, np.full(1000, 45, dtype=np.uint64))
    assert set(report.up["advertise"].values()) == {68}
    assert set(report.up["share"].values()) == {6 + 4 * 102}  # one sealed share per neighbour
    assert set(report.up["masked"].values()) == {9 + 4000}
    assert set(report.up["unmask"].values()) == {8 + 4 * 37}  # four b-shares, no key shares
    assert not report.revealed_key and report.revealed_self == set(inputs)


def test_below_min_survivors_no_unmasking_request_goes_out() -> None:
    params = SecAggParams(degree=4, threshold=3, min_survivors=8, bits=16)
    inputs = {c: np.ones(3, dtype=np.uint64) for c in range(10)}
    report = run_round(inputs, params, {0: 2, 1: 2, 2: 1})
    assert "fewer than min_survivors" in report.aborted
    assert report.unmask_requests == 0 and not report.up.get("unmask") and report.total is None


def test_a_split_survivor_graph_is_not_unmasked() -> None:
    """Two triangles: every secret has t surviving holders, yet unmasking would expose each
    triangle's sum on its own. (On the Harary ring the holder check already implies a connected
    survivor graph; this guards any other graph.)"""
    params = SecAggParams(degree=2, threshold=2, min_survivors=3, bits=16)
    server = SecAggServer(params, b"r", 1, os.urandom(32))
    server.graph = {u: frozenset({b + (u + 1) % 3, b + (u + 2) % 3}) for b in (0, 3) for u in range(b, b + 3)}
    server.sharers = set(server.graph)
    with pytest.raises(RoundAborted, match="split"):
        server.collect_masked([MaskedInput(c, 16, np.zeros(1, dtype=np.uint64)) for c in range(6)])


def _three_clients(round_id: bytes = b"r1") -> tuple[SecAggParams, dict[int, SecAggClient], dict]:
    params = SecAggParams(degree=2, threshold=2, min_survivors=3, bits=32)
    clients = {c: SecAggClient(c, params, round_id) for c in range(3)}
    ads = {c: cl.advertise() for c, cl in clients.items()}
    shares = {
        c: cl.share_keys(ShareKeysRequest(c, tuple(a for v, a in ads.items() if v != c))) for c, cl in clients.items()
    }
    return params, clients, {"ads": ads, "shares": shares}


def _inbox(shares: dict, cid: int) -> MaskedInputRequest:
    return MaskedInputRequest(cid, tuple(s for r in shares.values() for s in r.shares if s.receiver == cid))


def test_a_client_refuses_to_reveal_both_secrets_of_one_neighbour() -> None:
    _, clients, msgs = _three_clients()
    x = np.zeros(4, dtype=np.uint64)
    for c, cl in clients.items():
        cl.masked_input(_inbox(msgs["shares"], c), x)
    with pytest.raises(ProtocolError, match="both secrets"):
        clients[0].unmask(UnmaskRequest(0, (1, 2), (1,)))
    assert clients[0].phase is Phase.ABORTED
    with pytest.raises(ProtocolError):  # and it stays out of the round
        clients[0].unmask(UnmaskRequest(0, (1, 2), ()))
    # one answer per round: a second request (a different view of who dropped) is refused
    first = clients[1].unmask(UnmaskRequest(1, (0,), ()))
    assert set(first.self_mask_shares) == {0} and not first.key_shares
    with pytest.raises(ProtocolError):
        clients[1].unmask(UnmaskRequest(1, (), (0,)))
    with pytest.raises(ProtocolError, match="does not hold"):
        clients[2].unmask(UnmaskRequest(2, (0, 7), ()))


def test_a_relayed_share_opens_only_for_its_round_sender_and_receiver() -> None:
    _, clients, msgs = _three_clients()
    to_0 = _inbox(msgs["shares"], 0).shares
    x = np.zeros(2, dtype=np.uint64)
    from_1 = next(s for s in to_0 if s.sender == 1)
    with pytest.raises(ProtocolError):  # 1's share to 0 presented as 2's
        clients[0].masked_input(MaskedInputRequest(0, (EncryptedShare(2, 0, from_1.blob),)), x)
    with pytest.raises(ProtocolError):  # 1's share to 0 redirected to 2
        clients[2].masked_input(MaskedInputRequest(2, (EncryptedShare(1, 2, from_1.blob),)), x)
    # the same pair in another round: fresh keys, and the round is in the associated data
    _, later, _later_msgs = _three_clients(b"r2")
    stale = next(s for s in msgs["shares"][1].shares if s.receiver == 0)
    with pytest.raises(ProtocolError):
        later[0].masked_input(MaskedInputRequest(0, (stale,)), x)


def test_a_client_refuses_duplicate_keys_and_too_few_neighbours() -> None:
    params = SecAggParams(degree=4, threshold=3, min_survivors=4, bits=32)
    a, b, c = (SecAggClient(i, params, b"r") for i in range(3))
    ads = [a.advertise(), b.advertise(), c.advertise()]
    with pytest.raises(ProtocolError, match="neighbours"):
        a.share_keys(ShareKeysRequest(0, tuple(ads[1:])))  # 2 < t
    replayed = SecAggClient(5, params, b"r")
    replayed.advertise()
    with pytest.raises(ProtocolError, match="equal"):
        replayed.share_keys(ShareKeysRequest(5, (ads[1], ads[1].__class__(9, ads[1].c_pk, ads[2].s_pk), ads[2])))
    with pytest.raises(ProtocolError, match="phase"):
        b.masked_input(MaskedInputRequest(1, ()), np.zeros(1, dtype=np.uint64))  # out of order


def test_inputs_outside_the_ring_are_refused() -> None:
    _params, clients, msgs = _three_clients()
    with pytest.raises(ValueError, match="below 2"):
        clients[0].masked_input(_inbox(msgs["shares"], 0), np.array([2**32], dtype=np.uint64))


def test_a_restarted_round_masks_afresh_and_the_coordinator_sees_uniform_words() -> None:
    """The same inputs in the same round id twice (a coordinator restarted mid-round) give unrelated
    masked inputs: new keys and seeds per client object, never a reused mask. And what the coordinator
    holds of one client, its masked input, is uniform whatever the input."""
    params = SecAggParams(degree=4, threshold=3, min_survivors=4, bits=8)
    zeros = {c: np.zeros(20_000, dtype=np.uint64) for c in range(5)}
    seen = []
    for _ in range(2):
        clients = {c: SecAggClient(c, params, b"same-round") for c in zeros}
        ads = {c: cl.advertise() for c, cl in clients.items()}
        shares = {
            c: cl.share_keys(ShareKeysRequest(c, tuple(a for v, a in ads.items() if v != c)))
            for c, cl in clients.items()
        }
        seen.append(clients[0].masked_input(_inbox(shares, 0), zeros[0]).y)
    assert np.mean(seen[0] == seen[1]) < 0.01  # 1/256 by chance
    counts = np.bincount(seen[0].astype(np.int64), minlength=256)
    chi2 = float(((counts - 20_000 / 256) ** 2 / (20_000 / 256)).sum())
    assert chi2 < 360  # 255 degrees of freedom: p ~ 1e-4


def test_a_client_with_malformed_messages_counts_as_dropped_and_the_round_goes_on() -> None:
    params = SecAggParams(degree=6, threshold=4, min_survivors=5, bits=16)
    clients = {c: SecAggClient(c, params, b"r") for c in range(10)}
    x = {c: np.full(3, c, dtype=np.uint64) for c in clients}
    server = SecAggServer(params, b"r", 3, os.urandom(32))
    reqs = server.collect_advertise([c.advertise() for c in clients.values()])
    shares = [clients[c].share_keys(r) for c, r in reqs.items()]
    cheat = shares[0].cid
    shares[0] = ShareKeysResponse(cheat, shares[0].shares[:-1])  # one neighbour left out
    mask_reqs = server.collect_shares(shares)
    assert cheat not in mask_reqs and "one per neighbour" in server.refused[cheat]
    masked = [clients[c].masked_input(r, x[c]) for c, r in mask_reqs.items()]
    masked[0] = MaskedInput(masked[0].cid, 16, np.full(3, 2**16, dtype=np.uint64))  # outside the ring
    bad = masked[0].cid
    unmask = server.collect_masked(masked)
    total = server.finish([clients[c].unmask(r) for c, r in unmask.items()])
    assert bad in server.refused and server.survivors == set(clients) - {cheat, bad}
    assert np.array_equal(total, np.full(3, sum(server.survivors), dtype=np.uint64))


def test_in_the_driver_a_client_that_refuses_is_a_dropout() -> None:
    """A client whose input is outside the ring refuses to mask it; the round goes on without it."""
    params = SecAggParams(degree=4, threshold=3, min_survivors=4, bits=8)
    inputs = {c: np.full(2, c, dtype=np.uint64) for c in range(7)}
    inputs[3] = np.full(2, 300, dtype=np.uint64)
    report = run_round(inputs, params)
    assert set(report.refusals) == {3} and report.aborted is None
    assert report.survivors == set(inputs) - {3} and np.array_equal(report.total, np.full(2, 21 - 3, dtype=np.uint64))
