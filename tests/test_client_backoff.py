"""The client's retry loop: which errors it retries, and that its log names the call it retries."""

from __future__ import annotations

import logging

import grpc
import pytest

from gradcomp.client.retry import Backoff


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "test failure"


def failing(codes: list[grpc.StatusCode], result: str = "ok"):  # type: ignore[no-untyped-def]
    """A call that raises each of `codes` once, then returns `result`."""
    calls = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(codes):
            raise Failure(codes[len(calls) - 1])
        return result

    return fn, calls


def test_transient_errors_are_retried_and_logged_with_the_call_name(caplog: pytest.LogCaptureFixture) -> None:
    fn, calls = failing([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
    with caplog.at_level(logging.INFO, logger="gradcomp.client"):
        assert Backoff(budget=30.0, base=0.001, cap=0.002).call(fn, "PullTask") == "ok"
    assert len(calls) == 3
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2 and all(m.startswith("PullTask: ") for m in retries)
    assert "UNAVAILABLE, retry 1" in retries[0] and "DEADLINE_EXCEEDED, retry 2" in retries[1]


def test_spent_budget_gives_up_with_a_warning_naming_the_call(caplog: pytest.LogCaptureFixture) -> None:
    fn, calls = failing([grpc.StatusCode.UNAVAILABLE] * 10)
    with caplog.at_level(logging.INFO, logger="gradcomp.client"), pytest.raises(Failure):
        Backoff(budget=-1.0).call(fn, "SubmitUpdate")
    assert len(calls) == 1
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("SubmitUpdate: UNAVAILABLE for ") and "giving up" in record.getMessage()


def test_other_errors_are_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    fn, calls = failing([grpc.StatusCode.UNAUTHENTICATED])
    with caplog.at_level(logging.INFO, logger="gradcomp.client"), pytest.raises(Failure) as err:
        Backoff(budget=30.0).call(fn, "Join")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and len(calls) == 1 and not caplog.records
