"""One SecAgg+ round with in-process clients: the real client and coordinator state machines,
every message passed through its byte encoding, dropouts at any phase, bytes and CPU counted.

`completes[cid]` is how many phases a client finishes before it drops: 0 never advertises,
1 drops after advertising, 2 after sending shares, 3 after its masked input (it then sends no
unmasking shares); absent means it finishes the round. A client that refuses a request leaves the
round, which the coordinator sees as a dropout (`RoundReport.refusals` says who and why).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcomp.secagg.client import ProtocolError, SecAggClient
from gradcomp.secagg.params import SecAggParams
from gradcomp.secagg.server import RoundAborted, SecAggServer

PHASES = ("advertise", "share", "masked", "unmask")


@dataclass
class RoundReport:
    total: np.ndarray | None  # the unmasked modular sum, None when the round aborted
    aborted: str | None
    survivors: frozenset[int]  # the clients whose inputs are in `total`
    up: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))  # phase -> cid -> bytes
    down: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    client_seconds: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    server_seconds: dict[str, float] = field(default_factory=dict)  # CPU per phase
    unmask_requests: int = 0  # sent by the coordinator; 0 means no client revealed a share
    revealed_self: set[int] = field(default_factory=set)  # clients a share of whose b_u went out
    revealed_key: set[int] = field(default_factory=set)  # clients a share of whose s_sk went out
    refusals: dict[int, str] = field(default_factory=dict)  # clients that refused a request, and why


def _wire(msg: Any) -> tuple[Any, int]:
    """The message as the other side decodes it, and its size."""
    data = msg.to_bytes()
    return type(msg).from_bytes(data), len(data)


class _Driver:
    def __init__(self, report: RoundReport, clients: dict[int, SecAggClient], completes: Mapping[int, int]):
        self.report, self.clients, self.completes = report, clients, completes

    def alive(self, phase: int) -> list[int]:
        return [c for c in self.clients if self.completes.get(c, len(PHASES)) > phase]

    def server(self, phase: str, step: Callable[[list], Any], messages: list) -> Any:
        start = time.process_time()
        try:
            return step(messages)
        finally:
            self.report.server_seconds[phase] = time.process_time() - start

    def clients_answer(self, phase: int, requests: Mapping[int, object] | None, answer: Callable) -> list:
        """Delivers each request to its live client and collects the decoded answers."""
        name, out = PHASES[phase], []
        for cid in self.alive(phase):
            if requests is not None and cid not in requests:
                continue
            if requests is not None:
                request, self.report.down[name][cid] = _wire(requests[cid])
            else:
                request = None
            start = time.process_time()
            try:
                msg = answer(self.clients[cid], request)
            except ProtocolError as e:  # the client leaves the round: to the coordinator, a dropout
                self.report.refusals[cid] = str(e)
                continue
            finally:
                self.report.client_seconds[cid] += time.process_time() - start
            msg, self.report.up[name][cid] = _wire(msg)
            out.append(msg)
        return out


def run_round(
    inputs: Mapping[int, np.ndarray],
    params: SecAggParams,
    completes: Mapping[int, int] | None = None,
    round_id: bytes = b"round-0",
    graph_seed: bytes | None = None,
    dim: int | None = None,
) -> RoundReport:
    """Runs one round over `inputs` (cid -> uint64 vector in Z_(2^bits); read when the client masks
    it, so a lazy mapping works) and reports it. `dim` defaults to the first input's length; an input
    of another length aborts the round at the coordinator."""
    report = RoundReport(None, None, frozenset())
    clients = {cid: SecAggClient(cid, params, round_id) for cid in inputs}
    d = _Driver(report, clients, completes or {})
    dim = dim if dim is not None else len(next(iter(inputs.values())))
    server = SecAggServer(params, round_id, dim, graph_seed or os.urandom(32))
    try:
        ads = d.clients_answer(0, None, lambda c, _: c.advertise())
        share_reqs = d.server("advertise", server.collect_advertise, ads)
        shares = d.clients_answer(1, share_reqs, lambda c, r: c.share_keys(r))
        mask_reqs = d.server("share", server.collect_shares, shares)
        masked = d.clients_answer(2, mask_reqs, lambda c, r: c.masked_input(r, inputs[c.cid]))
        unmask_reqs = d.server("masked", server.collect_masked, masked)
        report.unmask_requests = len(unmask_reqs)
        answers = d.clients_answer(3, unmask_reqs, lambda c, r: c.unmask(r))
        for a in answers:
            report.revealed_self.update(a.self_mask_shares)
            report.revealed_key.update(a.key_shares)
        report.total = d.server("unmask", server.finish, answers)
        report.survivors = frozenset(server.survivors)
    except RoundAborted as e:
        report.aborted = str(e)
    return report
