"""The client's own privacy ledger (audit finding 10): a coordinator that asks a client every round
cannot take it past the client's --max-epsilon, and a redone round costs nothing new."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gradcomp.client.grpc_client import ClientError, FLClient
from gradcomp.config.fed import FedJob
from gradcomp.fedclient.ledger import BudgetSpent, ClientLedger, ledger_path
from gradcomp.privacy import PrivacyLedger
from gradcomp.server.app import round_loop, start

DELTA = 1e-5


def _epsilon(releases: int, sigma: float = 1.0) -> float:
    return PrivacyLedger(DELTA).epsilon_after(sigma, 1.0, releases)


def test_the_ledger_charges_each_release_once_and_refuses_past_the_cap(tmp_path: Path) -> None:
    cap = (_epsilon(2) + _epsilon(3)) / 2  # two releases fit, a third does not
    ledger = ClientLedger(tmp_path / "l.json", DELTA, cap)
    assert ledger.charge("r1", 1.0) == pytest.approx(_epsilon(1))
    assert ledger.charge("r1", 1.0) == pytest.approx(_epsilon(1))  # the same release resent: nothing new
    assert ledger.charge("r2", 1.0) == pytest.approx(_epsilon(2))
    with pytest.raises(BudgetSpent, match="--max-epsilon"):
        ledger.charge("r3", 1.0)
    assert (tmp_path / "l.json").stat().st_mode & 0o777 == 0o600
    again = ClientLedger(tmp_path / "l.json", DELTA, cap)  # a restarted client reads what it released
    assert set(again.releases) == {"r1", "r2"} and again.epsilon() == pytest.approx(_epsilon(2))
    with pytest.raises(BudgetSpent):
        again.charge("r4", 1.0)
    assert ClientLedger(tmp_path / "l.json", DELTA).charge("r4", 1.0) == pytest.approx(_epsilon(3))  # no cap


def test_two_processes_sharing_a_key_share_one_ledger(tmp_path: Path) -> None:
    """Each charge re-reads the file under a lock: one client's release is not lost to another's write."""
    first, second = ClientLedger(tmp_path / "l.json", DELTA), ClientLedger(tmp_path / "l.json", DELTA)
    first.charge("a", 1.0)
    assert second.charge("b", 1.0) == pytest.approx(_epsilon(2))
    assert set(ClientLedger(tmp_path / "l.json", DELTA).releases) == {"a", "b"}


JOB = {
    "name": "ledger",
    "task": {"name": "synthetic", "args": {"num_params": 500, "num_examples": 32, "input_dim": 8}},
    "rounds": 4,
    "clients": {"expected": 1, "min": 1},
    "round": {"min_clients": 1, "deadline_seconds": 30},
    "privacy": {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0},
    "server": {"port": 0, "heartbeat_seconds": 1, "linger_seconds": 0},
}


def test_gradcomp_client_stops_at_its_own_budget(tmp_path: Path) -> None:
    """The coordinator asks the only client every round; the client releases two and refuses the third."""
    run = start(FedJob.model_validate(JOB), tmp_path / "run", host="127.0.0.1", tokens={"token-aaaaaaaa": "c0"})
    stop = threading.Event()
    loop = threading.Thread(target=round_loop, args=(run, stop, False), daemon=True)
    loop.start()
    key_file = tmp_path / "noise.key"
    from gradcomp.cli import build_parser

    argv = ["client", "--server", f"127.0.0.1:{run.port}", "--token", "token-aaaaaaaa", "--quiet",
            "--retry-seconds", "10", "--noise-key-file", str(key_file),
            "--max-epsilon", str((_epsilon(2) + _epsilon(3)) / 2)]  # fmt: skip
    try:
        with pytest.raises(ClientError, match="refusing round 3: one more release"):
            FLClient(build_parser().parse_args(argv)).run()
        assert run.coord.version == 2  # the rounds it took part in were released
        assert len(ClientLedger(ledger_path(key_file), DELTA).releases) == 2
    finally:
        stop.set()
        loop.join(5)
        run.stop(0)
