"""Which gRPC errors `gradcomp client` retries, and how: exponential backoff with full jitter.

Transient errors (UNAVAILABLE, DEADLINE_EXCEEDED, and RESOURCE_EXHAUSTED with gRPC's own "Concurrent
RPC limit exceeded", which the coordinator's per-client call limit says too) are retried for up to
--retry-seconds, which also rides out a coordinator restart. A channel that stays UNAVAILABLE is
reopened (grpc/grpc#33593, #38290: one stuck in reconnect backoff answers from its cached failure).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger("gradcomp.client")

TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# gRPC's own answer when the coordinator serves server.max_concurrent_rpcs calls already: try again later.
BUSY_DETAILS = "Concurrent RPC limit exceeded"


def is_transient(err: grpc.RpcError) -> bool:
    """Worth retrying: the coordinator is unreachable, slow, or momentarily at its concurrent-call limit."""
    code = err.code()
    return code in TRANSIENT or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and BUSY_DETAILS in (err.details() or ""))


@dataclass
class Backoff:
    """Exponential backoff with full jitter, bounded by a total time budget."""

    budget: float
    base: float = 0.2
    cap: float = 2.0
    reopen_after: float = 5.0  # seconds of UNAVAILABLE before `reopen` is called (once per stretch)

    def call(self, fn: Callable[[], Any], what: str, reopen: Callable[[], None] | None = None) -> Any:
        """`fn()`, retried on transient errors until the budget is spent; `what` names the call in the log."""
        start, attempt = time.monotonic(), 0
        unavailable_since: float | None = None
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                code, now = err.code(), time.monotonic()
                if not is_transient(err):
                    raise
                if now - start > self.budget:
                    log.warning(
                        "%s: %s for %.1f s, giving up (retry budget %.0f s)", what, code.name, now - start, self.budget
                    )
                    raise
                if code != grpc.StatusCode.UNAVAILABLE:
                    unavailable_since = None
                elif unavailable_since is None:
                    unavailable_since = now
                elif reopen is not None and now - unavailable_since > self.reopen_after:
                    log.info("%s: unavailable for %.1f s, reopening the channel", what, now - unavailable_since)
                    reopen()  # a channel stuck in reconnect backoff (grpc/grpc#33593, #38290): start afresh
                    unavailable_since = None
                attempt += 1
                delay = random.uniform(0, min(self.cap, self.base * 2**attempt))
                log.info("%s: %s, retry %d in %.2f s", what, code.name, attempt, delay)
                time.sleep(delay)
