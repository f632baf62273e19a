"""Coordinator persistence: one checkpoint file per run, replaced atomically after every round.

runs/<name>/checkpoint.pb is a `gradcomp.v1.Checkpoint` protobuf (tensors as typed bytes,
the rest as JSON): global model, rounds completed, strategy state, accountant state, round
log and byte totals. Because it is a single file written by temp-file + rename, a kill -9 at
any moment leaves either the previous round's state or the new one, never a mix. The round
log inside the checkpoint is the source of truth for results.json on resume, so no round is
lost or counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradcomp._proto import checkpoint_pb2
from gradcomp.protocol.codec import named_to_pb, pb_to_named
from gradcomp.results import atomic_write_bytes

FORMAT = 1
FILENAME = "checkpoint.pb"


def save_state(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write a `Coordinator.state_dict()` atomically; returns the checkpoint path."""
    msg = checkpoint_pb2.Checkpoint(format=FORMAT, round=int(state["version"]))
    msg.model.extend(named_to_pb(state["params"]))
    strategy = state["strategy"]
    msg.strategy_state.extend(named_to_pb(strategy["tensors"]))
    meta = {
        "status": state["status"],
        "reason": state["reason"],
        "strategy_scalars": strategy["scalars"],
        "ledger": state["ledger"],
        "client_ledger": state.get("client_ledger"),
        "log": state["log"],
        "totals": state["totals"],
    }
    msg.meta_json = json.dumps(meta)
    path = Path(run_dir) / FILENAME
    atomic_write_bytes(path, msg.SerializeToString())
    return path


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """Read a checkpoint back into the `Coordinator.load_state_dict()` form."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
    msg = checkpoint_pb2.Checkpoint()
    try:
        msg.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises DecodeError
        raise ValueError(f"{path}: not a gradcomp checkpoint: {err}") from err
    if msg.format != FORMAT:
        raise ValueError(f"{path}: checkpoint format {msg.format}, this gradcomp reads {FORMAT}")
    meta = json.loads(msg.meta_json)
    return {
        "version": int(msg.round),
        "status": meta["status"],
        "reason": meta["reason"],
        "params": pb_to_named(list(msg.model)),
        "strategy": {"tensors": pb_to_named(list(msg.strategy_state)), "scalars": meta["strategy_scalars"]},
        "ledger": meta["ledger"],
        "client_ledger": meta.get("client_ledger"),
        "log": meta["log"],
        "totals": meta["totals"],
    }
