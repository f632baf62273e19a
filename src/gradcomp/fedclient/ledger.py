"""A client's own record of the releases of its data, so a coordinator that asks it every round
cannot spend its privacy past the limit the client set.

In local DP the coordinator is the adversary, and it decides how often a client is asked: the
coordinator's ledger is its own word. `gradcomp client` keeps this ledger next to its noise key
and charges each release before it trains: the Gaussian mechanism at q = 1 (the client knows it
takes part) with the spec's noise multiplier, composed over every release it recorded, across
jobs, since they all draw on the same data. A release is identified by a digest of its noise key
(`noisekey.release_key`): a round asked again with the same inputs re-sends the same noisy update
and costs nothing new; any other input is a new release. With `--max-epsilon` the client refuses
the release that would pass it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from gradcomp.errors import GradcompError
from gradcomp.privacy import PrivacyLedger
from gradcomp.results import atomic_write_bytes


class BudgetSpent(GradcompError, ValueError):
    """One more release would pass the client's --max-epsilon."""


def release_id(release_key: bytes) -> str:
    """What the ledger records of a release: a digest of its noise key (not the key itself)."""
    return hashlib.sha256(b"gradcomp-release-id\x1f" + release_key).hexdigest()


def ledger_path(key_file: Path) -> Path:
    """The ledger lives next to the key whose releases it records."""
    return key_file.with_name(key_file.name + ".ledger.json")


class ClientLedger:
    """Releases (id -> noise multiplier) in a JSON file written atomically, 0600. Client processes that
    share a key file share its ledger: each charge re-reads it under an exclusive lock."""

    def __init__(self, path: str | Path, delta: float, max_epsilon: float | None = None):
        self.path = Path(path)
        self.delta, self.max_epsilon = delta, max_epsilon
        self.releases: dict[str, float] = {}
        self._reload()

    def _reload(self) -> None:
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.releases = {str(k): float(v) for k, v in data["releases"].items()}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _accountant(self) -> PrivacyLedger:
        ledger = PrivacyLedger(self.delta)
        for sigma, count in Counter(self.releases.values()).items():
            ledger.step(sigma, 1.0, count)
        return ledger

    def epsilon(self) -> float:
        """Epsilon at `delta` over every recorded release."""
        return self._accountant().epsilon()

    def charge(self, release: str, noise_multiplier: float) -> float:
        """Record `release` (persisted before it returns, so before the update is sent) and return the
        epsilon spent. A release already recorded costs nothing; one past `max_epsilon` raises BudgetSpent."""
        with self._locked():
            self._reload()
            if release in self.releases:
                return self.epsilon()
            after = self._accountant().epsilon_after(noise_multiplier, 1.0)
            if self.max_epsilon is not None and after > self.max_epsilon:
                raise BudgetSpent(
                    f"one more release at noise multiplier {noise_multiplier} would reach epsilon {after:.3f} "
                    f"> --max-epsilon {self.max_epsilon} (delta {self.delta:g}, {len(self.releases)} releases so "
                    f"far, ledger {self.path})"
                )
            self.releases[release] = noise_multiplier
            atomic_write_bytes(self.path, json.dumps({"delta": self.delta, "releases": self.releases}).encode())
            return after
