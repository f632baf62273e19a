"""Coordinator persistence: one checkpoint file per run, replaced atomically after every round
(and, in local DP, when a round asks clients, so their charge survives a crash).

runs/<name>/checkpoint.pb is a `gradcomp.v1.Checkpoint` protobuf (tensors as typed bytes,
the rest as JSON): global model, rounds completed, strategy state, accountant state (each
released round's sampling rate; in local DP the clients already charged for the open round),
round log, byte totals and the coordinator's secret (the key of its client sampling and
central-DP noise: the file is created 0600 and must stay private to the coordinator). Because
it is a single file written by temp-file + rename, a kill -9 at any moment leaves either the
previous state or the new one, never a mix. The round log inside the checkpoint is the source
of truth for results.json on resume, so no round is lost or counted twice. Format 2 files
(every round charged at the configured m / N) are migrated to upper bounds on load
(`_from_format_2`); format 2 and 3 files hold no secret (their sampling and central-DP noise
were keyed by the job seed), so the resumed coordinator keeps the fresh one it started with.

The file is MAGIC + SHA-256 of the protobuf + the protobuf. Loading checks the checksum (a
truncated or bit-flipped file), the schema of the meta JSON (known status, a round log that
holds exactly rounds 1..round, non-negative totals, a 32-byte secret) and that every tensor is
finite, and raises `CheckpointError` naming the file and the problem: `gradcomp serve --resume`
then exits 2 instead of serving a damaged model. A format other than 2, 3 or 4 is refused the
same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from gradcomp._proto import checkpoint_pb2
from gradcomp.errors import GradcompError, UserError
from gradcomp.protocol.codec import named_to_pb, pb_to_named
from gradcomp.results import atomic_write_bytes

FORMAT = 4  # 2: a SHA-256 of the protobuf; 3: each round charged at its real sampling rate; 4: the secret
READS = (2, 3, 4)  # format 2 is migrated to upper bounds on load (`_from_format_2`); 2 and 3 hold no secret
MAGIC = b"GCCK\x02"
_DIGEST = 32
STATUSES = ("running", "finished", "budget_exhausted", "failed")
META_TYPES = {"status": str, "reason": str, "strategy_scalars": dict, "log": list, "totals": dict}
SECRET_HEX = 64  # the coordinator's 32-byte secret, hex (format 4 on)
MAX_ROUND = 2**31 - 1


class CheckpointError(GradcompError, ValueError):
    """A checkpoint that must not start a coordinator; the message names the file and the problem."""


FILENAME = "checkpoint.pb"


def save_state(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write a `Coordinator.state_dict()` atomically; returns the checkpoint path."""
    msg = checkpoint_pb2.Checkpoint(format=FORMAT, round=int(state["version"]))
    msg.model.extend(named_to_pb(state["params"]))
    strategy = state["strategy"]
    msg.strategy_state.extend(named_to_pb(strategy["tensors"]))
    meta = {
        "job": state.get("job"),
        "status": state["status"],
        "reason": state["reason"],
        "strategy_scalars": strategy["scalars"],
        "ledger": state["ledger"],
        "client_ledger": state.get("client_ledger"),
        "distributed_ledger": state.get("distributed_ledger"),
        "charged_round": state.get("charged_round"),
        "log": state["log"],
        "totals": state["totals"],
        "liveness": state.get("liveness"),
        "secret": state["secret"],
    }
    msg.meta_json = json.dumps(meta)
    path = Path(run_dir) / FILENAME
    body = msg.SerializeToString()
    atomic_write_bytes(path, MAGIC + hashlib.sha256(body).digest() + body)
    return path


def _verified_message(path: Path) -> checkpoint_pb2.Checkpoint:
    """The checkpoint protobuf, after the checksum over its bytes matched (truncation, flipped bits)."""
    data = path.read_bytes()
    head = len(MAGIC) + _DIGEST
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a gradcomp checkpoint of format {FORMAT} (no checksum header)")
    body = data[head:]
    if hashlib.sha256(body).digest() != data[len(MAGIC) : head]:
        raise CheckpointError(f"{path}: checksum mismatch: the file is truncated or corrupted")
    msg = checkpoint_pb2.Checkpoint()
    try:
        msg.ParseFromString(body)
    except Exception as err:  # protobuf raises DecodeError
        raise CheckpointError(f"{path}: not a gradcomp checkpoint: {err}") from err
    if msg.format not in READS:
        raise CheckpointError(f"{path}: checkpoint format {msg.format}, this gradcomp reads {READS}")
    return msg


def _checked_meta(path: Path, msg: checkpoint_pb2.Checkpoint) -> dict[str, Any]:
    """The meta JSON, with every key the coordinator reads present, typed and consistent."""
    try:
        meta = json.loads(msg.meta_json)
    except ValueError as err:
        raise CheckpointError(f"{path}: meta is not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta is {type(meta).__name__}, expected an object")
    for key, kind in META_TYPES.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: meta key {key!r} is missing or not a {kind.__name__}")
    if msg.format >= 4:
        secret = meta.get("secret")
        if not isinstance(secret, str) or len(secret) != SECRET_HEX or any(c not in "0123456789abcdef" for c in secret):
            raise CheckpointError(f"{path}: the coordinator secret must be {SECRET_HEX} lowercase hex digits")
    else:
        meta["secret"] = None  # formats 2 and 3 keyed sampling and noise by the job seed: nothing to continue
    if meta["status"] not in STATUSES:
        raise CheckpointError(f"{path}: unknown status {meta['status']!r}; expected one of {', '.join(STATUSES)}")
    if msg.round > MAX_ROUND:
        raise CheckpointError(f"{path}: round {msg.round} is out of range")
    rounds = [e.get("round") if isinstance(e, dict) else None for e in meta["log"]]
    if rounds != list(range(1, msg.round + 1)):
        raise CheckpointError(f"{path}: round {msg.round} but the round log holds rounds {rounds[:5]}...")
    if any(not isinstance(v, int) or v < 0 for v in meta["totals"].values()):
        raise CheckpointError(f"{path}: byte totals must be non-negative integers")
    liveness = meta.get("liveness") or {}
    counts = [liveness.get(k) for k in ("misses", "benched_until")] if isinstance(liveness, dict) else [None]
    if liveness and not all(
        isinstance(c, dict) and all(isinstance(v, int) and v >= 0 for v in c.values()) for c in counts
    ):
        raise CheckpointError(f"{path}: liveness must map clients to non-negative miss counts and round numbers")
    charged = meta.get("charged_round") or {}
    if charged and not (
        isinstance(charged, dict)
        and isinstance(charged.get("round"), int)
        and isinstance(charged.get("clients"), list)
        and all(isinstance(n, str) for n in charged["clients"])
    ):
        raise CheckpointError(f"{path}: charged_round must hold a round number and a list of client names")
    return meta


def _from_format_2(meta: dict[str, Any], rounds: int) -> None:
    """Format 2 charged every round at the configured m / N and local DP only the last attempt's
    clients, so its epsilon can be too low. Migrated to upper bounds: every released round at q = 1,
    and in local DP every client at one participation per round (those the old ledger named, and an
    unnamed entry for any other client, with one more for a round a crash may have interrupted)."""
    ledger = meta.get("ledger")
    if isinstance(ledger, dict) and isinstance(ledger.get("history"), list):
        ledger["history"] = [[h[0], 1.0, h[2]] for h in ledger["history"]]
    clients = meta.get("client_ledger")
    if isinstance(clients, dict) and isinstance(clients.get("participations"), dict):
        named = dict.fromkeys(clients["participations"], rounds)
        clients["participations"] = {**named, "(any client, migrated from checkpoint format 2)": rounds + 1}


def _finite(path: Path, what: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: {what} tensor {name!r} holds NaN or infinite values")
    return tensors


def _tensors(path: Path, what: str, items: Any) -> dict[str, torch.Tensor]:
    try:
        return _finite(path, what, pb_to_named(list(items)))
    except ValueError as err:  # WireError: a tensor that does not decode
        raise CheckpointError(f"{path}: {what}: {err}") from None


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """Read a checkpoint back into the `Coordinator.load_state_dict()` form, verified: checksum, schema,
    finite tensors. Anything else raises `CheckpointError`, so a damaged file never starts a coordinator."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
    msg = _verified_message(path)
    meta = _checked_meta(path, msg)
    if msg.format == 2:
        _from_format_2(meta, int(msg.round))
    params = _tensors(path, "model", msg.model)
    if not params:
        raise CheckpointError(f"{path}: the checkpoint holds no model tensors")
    return {
        "job": meta.get("job"),
        "version": int(msg.round),
        "status": meta["status"],
        "reason": meta["reason"],
        "params": params,
        "strategy": {"tensors": _tensors(path, "strategy", msg.strategy_state), "scalars": meta["strategy_scalars"]},
        "ledger": meta.get("ledger"),
        "client_ledger": meta.get("client_ledger"),
        "distributed_ledger": meta.get("distributed_ledger"),
        "charged_round": meta.get("charged_round"),
        "log": meta["log"],
        "totals": meta["totals"],
        "liveness": meta.get("liveness"),
        "secret": meta["secret"],
    }


def check_same_job(saved: Any, current: dict[str, Any]) -> None:
    """A checkpoint continues only the job that wrote it: another strategy would misread its state,
    another seed, task or privacy setting would make one run out of two (and its epsilon wrong)."""
    if not isinstance(saved, dict):
        raise UserError(
            "checkpoint records no job (written by an older gradcomp): cannot check that it belongs to this job"
        )
    changed = sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))
    if changed:
        raise UserError(
            f"checkpoint was written for a different job (changed: {', '.join(changed)}); "
            "resume with the job file it was started with, or start a new run"
        )
