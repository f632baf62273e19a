"""The CLI tells a user's mistake from gradcomp's own: a `GradcompError` is one line and exit 2, any
other exception is an internal error shown with its traceback (exit 1), so a bug is never dressed
up as bad input."""

from __future__ import annotations

import pytest

from gradcomp import cli
from gradcomp.audit import run as audit_run
from gradcomp.errors import GradcompError, UserError


def _fail_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def handler(args: object) -> int:
        raise exc

    monkeypatch.setattr(audit_run, "run_audit", handler)


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    _fail_with(monkeypatch, UserError("--victims must be positive"))
    assert cli.main(["audit", "--spec", "none"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "gradcomp audit: error: --victims must be positive"


def test_an_internal_error_shows_its_traceback_and_exit_1(monkeypatch, capsys) -> None:
    _fail_with(monkeypatch, ValueError("shapes do not broadcast"))  # a bug, not the user's input
    assert cli.main(["audit", "--spec", "none"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "shapes do not broadcast" in err and "internal error" in err


def test_every_package_error_is_a_gradcomp_error() -> None:
    from gradcomp.client.answers import ClientError
    from gradcomp.compression import SpecError, WireError
    from gradcomp.config.common import ConfigError
    from gradcomp.fedclient.config import BadTrainingConfig, TaskRefused
    from gradcomp.partition import PartitionError
    from gradcomp.server.store import CheckpointError
    from gradcomp.server.updates import Rejected
    from gradcomp.tasks import TaskError

    for cls in (ClientError, SpecError, WireError, ConfigError, BadTrainingConfig, TaskRefused, PartitionError,
                CheckpointError, Rejected, TaskError):  # fmt: skip
        assert issubclass(cls, GradcompError), cls
