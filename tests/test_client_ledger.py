"""The client's own privacy ledger, against a coordinator that over-asks: a coordinator that asks a client every round
cannot take it past the client's --max-epsilon, and a redone round costs nothing new."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from gradcomp.client.grpc_client import ClientError, FLClient
from gradcomp.compression import from_fields
from gradcomp.config.fed import FedJob
from gradcomp.fedclient.ledger import BudgetSpent, ClientLedger, ledger_path
from gradcomp.privacy import PrivacyLedger
from gradcomp.protocol.messages import update_fields
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


@pytest.mark.server
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


def _release_after_restart(tmp_path: Path, key_file: Path, tokens: dict[str, str], tag: str) -> FLClient:
    """A fresh coordinator of the same one-round job, and a fresh `gradcomp client` process (token
    "token-me-aaaaaaaa", named c1 by the coordinator) with the same key file: one release."""
    job = FedJob.model_validate(JOB | {"rounds": 1, "clients": {"expected": 2, "min": 1}})
    run = start(job, tmp_path / tag, host="127.0.0.1", tokens=tokens)
    stop = threading.Event()
    loop = threading.Thread(target=round_loop, args=(run, stop, False), daemon=True)
    loop.start()
    from gradcomp.cli import build_parser

    argv = ["client", "--server", f"127.0.0.1:{run.port}", "--token", "token-me-aaaaaaaa", "--quiet",
            "--retry-seconds", "10", "--noise-key-file", str(key_file)]  # fmt: skip
    try:
        client = FLClient(build_parser().parse_args(argv))
        client.run()
        return client
    finally:
        stop.set()
        loop.join(5)
        run.stop(0)


def _sent_and_clipped(client: FLClient) -> tuple[torch.Tensor, torch.Tensor]:
    """The update the client sent (noised) and, recomputed from its data, the clipped update it noised."""
    assert client.runtime is not None and client.data is not None and client.last_request is not None
    rt, req = client.runtime, client.last_request
    sent = {k: from_fields(f).to_dense() for k, f in update_fields(req).items()}
    trained = rt.train(client.client_id, req.round, client.data)
    delta = torch.cat([(trained.params[k].float() - g).reshape(-1) for k, g in rt.global_params.items()])
    clip = JOB["privacy"]["clip"]  # type: ignore[index]
    return torch.cat([sent[k].reshape(-1) for k in rt.global_params]), delta * min(1.0, clip / float(delta.norm()))


@pytest.mark.server
def test_a_restarted_client_given_another_shard_draws_fresh_noise_and_is_charged_again(tmp_path: Path) -> None:
    """The coordinator is the adversary. It restarts the job and asks the same client (same key file,
    name, round, model, config) again, but assigns it another shard. With the noise keyed by those
    inputs alone, both releases carried the same noise, so their difference was exactly the
    difference of the two clipped updates (error 1.7e-7 against a noise std of 1), and the client's
    ledger saw one release id and charged one release. The key covers the data: fresh noise, two charges."""
    key_file = tmp_path / "noise.key"
    first = _release_after_restart(tmp_path, key_file, {"token-me-aaaaaaaa": "c1"}, "a")
    # the same client, now second in the sorted names: the coordinator assigns it the other shard
    second = _release_after_restart(tmp_path, key_file, {"token-me-aaaaaaaa": "c1", "token-xx-aaaaaaaa": "c0"}, "b")
    assert (first.shard, second.shard) == ((0, 2), (1, 2))
    assert first.client_id == second.client_id == "c1"
    assert first.last_request is not None and second.last_request is not None
    assert (first.last_request.round, first.last_request.model_version) == (
        second.last_request.round,
        second.last_request.model_version,
    )
    (sent_a, clipped_a), (sent_b, clipped_b) = _sent_and_clipped(first), _sent_and_clipped(second)
    assert float((clipped_a - clipped_b).norm()) > 0.01  # different data: different clipped updates
    error = (sent_a - sent_b) - (clipped_a - clipped_b)  # what the attack recovers, minus the truth
    # independent noise in each release: the difference carries noise of std sqrt(2) * sigma * clip
    assert float(error.std()) == pytest.approx(2**0.5, rel=0.15)
    assert len(ClientLedger(ledger_path(key_file), DELTA).releases) == 2  # two releases, two charges
