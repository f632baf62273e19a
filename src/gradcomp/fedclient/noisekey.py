"""The secret a client's local-DP noise comes from.

The coordinator sends the job seed in every `TrainingConfig` and names the client and the round,
so noise derived from those it can regenerate and subtract: it recovered the exact clipped update.
A client's noise for one release is instead drawn from a `KeyedStream` under

    HMAC(client key, "local-dp-noise/v<NOISE_KEY_VERSION>", software, config digest, data digest,
         client name, round, model version, model digest)

- the client key: 32 bytes from os.urandom that the client keeps and never sends
  (`gradcomp client --noise-key-file`, created 0600 on first use, `default_key_path()`);
- the rest: every input the update is a function of. The same inputs give the same noise, so a
  round asked again (a lost submit, a resumed coordinator, a restarted client) re-sends the same
  noisy update instead of a second, independent release to average. Any other input gives
  independent noise: two releases that shared noise on different updates would differ by exactly
  the difference of the clipped updates, so a coordinator that asks a restarted client the same
  round on another shard (or model, config, name) must not get the same noise.

The config digest hashes an explicit, versioned list of fields (`CONFIG_FIELDS`), not whatever the
dataclass holds: adding a field to `LocalTrainingConfig` fails loudly here until it is listed (or
excluded with a reason) and `NOISE_KEY_VERSION` is bumped, so a new training setting can neither
silently share noise across updates it changes nor silently change every existing key.

Batch order and randomk positions stay keyed by the job seed (`seeds.round_seed`): they are not
what protects the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gradcomp import __version__
from gradcomp.errors import GradcompError
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import ClientData
from gradcomp.keyed_random import KEY_BYTES, check_key, new_key, subkey

# Bump when CONFIG_FIELDS, their encoding or release_key's inputs change: every key (and every ledger
# release id) changes with it, so a client upgraded mid-job makes fresh releases and is charged for them.
NOISE_KEY_VERSION = 5
# The LocalTrainingConfig fields a release's update depends on; every field must be listed here.
CONFIG_FIELDS = (
    "task",
    "task_args",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "spec",
    "seed",
    "strategy",
    "strategy_settings",
    "steps",
    "secure",
)
# The code that computes the update: another version may compute another update from the same inputs.
SOFTWARE = f"gradcomp {__version__}; torch {torch.__version__}"

# Which key a client of a given name draws its noise with (a real client: its one key whatever the
# coordinator calls it; the simulation: a key per virtual client).
NoiseKeys = Callable[[str], bytes]


@dataclass(frozen=True)
class OneKey:
    """A real client's key, used whatever name the coordinator gives it."""

    key: bytes

    def __post_init__(self) -> None:
        check_key(self.key, "client noise key")

    def __call__(self, client: str) -> bytes:
        return self.key


def fresh_keys() -> OneKey:
    """A key that lives as long as the process: secret, but a restarted client draws new noise."""
    return OneKey(new_key())


class UnlistedConfigField(TypeError):
    """`LocalTrainingConfig` holds a field the noise key does not list (a programming error)."""


def config_digest(config: LocalTrainingConfig) -> str:
    """SHA-256 of the `CONFIG_FIELDS` of the training config as canonical JSON, tagged with
    `NOISE_KEY_VERSION` (the coordinator's choices for every round)."""
    unlisted = sorted({f.name for f in dataclasses.fields(config)} - set(CONFIG_FIELDS))
    if unlisted:
        raise UnlistedConfigField(
            f"LocalTrainingConfig field(s) {unlisted} are not in noisekey.CONFIG_FIELDS: a setting that changes "
            "the update must be part of the local-DP noise key (add it and bump NOISE_KEY_VERSION)"
        )
    fields = {name: getattr(config, name) for name in CONFIG_FIELDS}
    text = json.dumps([NOISE_KEY_VERSION, fields], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def release_key(
    client_key: bytes,
    *,
    config_sha: str,
    data: ClientData,
    client: str,
    round: int,
    model_version: int,
    model_digest: str,
) -> bytes:
    """The key of one release's noise (see the module docstring); `config_sha` is `config_digest(config)`,
    `data` the examples the update is trained on."""
    return subkey(
        client_key,
        f"local-dp-noise/v{NOISE_KEY_VERSION}",
        SOFTWARE,
        config_sha,
        data.digest,
        client,
        round,
        model_version,
        model_digest,
    )


def default_key_path() -> Path:
    """$XDG_STATE_HOME/gradcomp/client-noise.key (~/.local/state when the variable is unset)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gradcomp" / "client-noise.key"


class KeyFileError(GradcompError, ValueError):
    """A key file that must not be used (readable by others, wrong size, not hex)."""


def load_or_create_key(path: str | Path) -> bytes:
    """The key in `path` (64 hex digits), made from os.urandom and written 0600 when the file is missing.
    Two clients creating it at once both end up with the one that reached the disk first."""
    path = Path(path)
    if not path.exists():
        _create(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: the noise key is readable by other users (mode {mode & 0o777:o}); chmod 600 it")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: expected {2 * KEY_BYTES} hex digits (a {KEY_BYTES}-byte noise key)")
    return key


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")  # clients may share a process
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_key().hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another client made it first: use theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
