"""`gradcomp client`: a federated participant over gRPC.

Loop: join -> pull task -> (TRAIN) fetch the global model in chunks (once per version), let
the shared client runtime (`fedclient/`) train on this client's shard and build the update
(error-feedback memory lives in this process across rounds), submit -> ... until the
coordinator says DONE, then leave and exit 0. Asked again for a round it already trained
(its submit was lost), it resends the same update instead of training twice.

Its local-DP noise comes from a key only it holds (`--noise-key-file`, default
`fedclient.noisekey.default_key_path()`, created 0600 from os.urandom on first use), never from
the job seed the coordinator sends; keeping the file keeps a restarted client's redone round
identical to the update it replaces (`fedclient/noisekey.py`).

Transient gRPC errors (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff and jitter
for up to --retry-seconds, which also rides out a coordinator restart (`gradcomp serve --resume`).
A refused update (stale round, duplicate, ...) is logged and the client pulls the next task.

Two details keep a coordinator crash from taking the client down with it:
- The channel's own reconnect backoff is capped at about a second (`RECONNECT_OPTIONS`). With
  gRPC's default (x1.6 up to 120 s) a channel that saw the coordinator down for ~30 s waits
  tens of seconds before its next connection attempt, and every fail-fast RPC in between
  answers UNAVAILABLE from the cached failure, so --retry-seconds ran out while the resumed
  coordinator was already serving.
- The heartbeat thread is stopped (its in-flight RPC cancelled) and joined, and the channel
  closed, on every exit path. A thread still inside a gRPC call while the interpreter
  finalises is torn down under gRPC's C++ frames, which aborts the process (SIGABRT,
  "FATAL: exception not rethrown").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.client.answers import (
    ClientError,
    assigned_shard,
    check_action,
    check_chunk,
    check_download,
    heartbeat_seconds,
    parse_shard,
    wait_seconds,
)
from gradcomp.client.credentials import printable, resolve_token
from gradcomp.client.retry import Backoff, is_transient
from gradcomp.client.secure_rounds import take_part
from gradcomp.errors import UserError
from gradcomp.fedclient.config import ConfigCheck, LocalTrainingConfig, TaskRefused
from gradcomp.fedclient.data import ClientData, iid_shard
from gradcomp.fedclient.ledger import BudgetSpent, ClientLedger, ledger_path, release_id
from gradcomp.fedclient.limits import WorkLimits, memory_ceiling
from gradcomp.fedclient.noisekey import KeyFileError, OneKey, default_key_path, load_or_create_key
from gradcomp.fedclient.policy import ClientPolicy
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.fedclient.train import RoundTooLong, SGDTrainer
from gradcomp.protocol.channel import channel_credentials, is_local_target
from gradcomp.protocol.messages import PROTOCOL_VERSION

log = logging.getLogger("gradcomp.client")

MAX_MESSAGE = 256 * 1024 * 1024  # the client accepts what the coordinator's limits allow
# Reconnect to a restarted coordinator within about a second (see module docstring).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _noise_keys(path: Path) -> OneKey:
    """The client's secret noise key from `path`, created on first use."""
    try:
        return OneKey(load_or_create_key(path))
    except (KeyFileError, OSError) as err:
        raise ClientError(f"--noise-key-file: {err}") from None


def _ledger(key_file: Path, args: argparse.Namespace) -> ClientLedger:
    """The client's own ledger of releases, next to its key (`fedclient/ledger.py`)."""
    delta, cap = float(getattr(args, "delta", None) or 1e-5), getattr(args, "max_epsilon", None)
    if not 0 < delta < 1 or (cap is not None and not cap > 0):
        raise ClientError(f"--delta must be in (0, 1) and --max-epsilon > 0, got {delta} and {cap}")
    try:
        return ClientLedger(ledger_path(key_file), delta, cap)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ClientError(f"privacy ledger {ledger_path(key_file)} is unreadable ({err}); move it aside") from None


class FLClient:
    """One participant; `run()` returns when the job is done."""

    def __init__(self, args: argparse.Namespace, checks: Sequence[ConfigCheck] | None = None):
        token, self.warnings = resolve_token(args)  # TokenError (a ValueError) when there is none
        self.args = args
        self.timeout = float(getattr(args, "rpc_timeout", 30.0))
        self.backoff = Backoff(float(getattr(args, "retry_seconds", 60.0)))
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.client_id = args.client_id or f"{socket.gethostname()}-{os.getpid()}"
        self._creds = None
        if args.tls_ca or args.tls_cert:
            self._creds = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        elif not getattr(args, "insecure", False) and not is_local_target(args.server):
            raise UserError(
                f"refusing to connect without TLS to {args.server}, which is not a loopback address: the token "
                "and the updates would cross the network in clear text. Pass --tls-ca (and --tls-cert/--tls-key "
                "for mutual TLS), or accept clear text with --insecure"
            )
        self.shard = parse_shard(args.shard)  # before the channel opens, so a bad --shard leaks nothing
        key_file = Path(getattr(args, "noise_key_file", None) or default_key_path())
        self.noise_keys = _noise_keys(key_file)
        self.ledger = _ledger(key_file, args)
        self.channel, self.stub = self._open()
        # The client's own checks on a task before it trains; by default its policy flags (fedclient.policy).
        self.checks = ClientPolicy.from_args(args).checks() if checks is None else checks
        self.limits = WorkLimits.from_args(args)  # the work one round may take (fedclient/limits.py)
        self.task_key: str | None = None
        self.runtime: ClientRuntime | None = None
        self.data: ClientData | None = None
        self.memory = ClientMemory()
        self.last_request: fed_pb2.SubmitUpdateRequest | None = None
        self.last_secure: np.ndarray | None = None  # secure input (resent if redone)
        self.on_secure_phase: Callable[[int], None] | None = None  # test hook per phase
        self.rounds_done = 0
        self._stop = threading.Event()
        self._beat_lock = threading.Lock()
        self._beat_call: grpc.Future | None = None
        self._beat_thread: threading.Thread | None = None
        self.log = (
            (lambda msg: print(printable(f"[client {self.client_id}] {msg}"), flush=True))
            if not args.quiet
            else (lambda msg: None)
        )

    def _open(self) -> tuple[grpc.Channel, fed_pb2_grpc.CoordinatorStub]:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.use_local_subchannel_pool", 1),  # a reopened channel must not inherit the old connection
            *RECONNECT_OPTIONS,
        ]
        if self._creds is not None:
            channel = grpc.secure_channel(self.args.server, self._creds, options=options)
        else:
            channel = grpc.insecure_channel(self.args.server, options=options)
        return channel, fed_pb2_grpc.CoordinatorStub(channel)

    def _reopen(self) -> None:
        """Replace the channel (main thread only); the heartbeat picks up the new stub on its next beat."""
        with self._beat_lock:
            old, (self.channel, self.stub) = self.channel, self._open()
        old.close()  # cancels a heartbeat still in flight on it; the heartbeat ignores that

    def _rpc(self, method: str, request: Any) -> Any:
        def attempt() -> Any:
            return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)

        return self.backoff.call(attempt, method, reopen=self._reopen)

    # --- protocol ---------------------------------------------------------------------------
    def join(self) -> fed_pb2.JoinResponse:
        try:
            resp = self._rpc("Join", fed_pb2.JoinRequest(client_id=self.client_id, protocol_version=PROTOCOL_VERSION))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ClientError(f"coordinator refused the token: {err.details()}") from None
            raise
        if self.shard is None:
            self.shard = assigned_shard(resp)
        self.client_id = resp.client_name or self.client_id
        self.log(f"joined job {resp.job_name!r} as {resp.client_name!r}, shard {self.shard[0]}/{self.shard[1]}")
        return resp

    def _heartbeat(self, every: float) -> None:
        timeout = min(self.timeout, max(1.0, every))
        while not self._stop.wait(every):
            with self._beat_lock:  # stop_heartbeat() either sees this call and cancels it, or it never starts
                if self._stop.is_set():
                    return
                call = self._beat_call = self.stub.Heartbeat.future(
                    fed_pb2.HeartbeatRequest(client_id=self.client_id), timeout=timeout, metadata=self.metadata
                )
            with contextlib.suppress(grpc.RpcError, grpc.FutureCancelledError):  # the main loop handles outages
                call.result()

    def start_heartbeat(self, every: float) -> None:
        self._stop.clear()
        self._beat_thread = threading.Thread(target=self._heartbeat, args=(every,), name="heartbeat")
        self._beat_thread.start()

    def stop_heartbeat(self) -> None:
        """Cancel the in-flight heartbeat and join its thread, so no thread is inside gRPC at exit."""
        with self._beat_lock:
            self._stop.set()
            if self._beat_call is not None:
                self._beat_call.cancel()
        if self._beat_thread is not None:
            self._beat_thread.join()
            self._beat_thread = None

    def close(self) -> None:
        """Stop the heartbeat, then close the channel (cancels anything still in flight). Idempotent."""
        self.stop_heartbeat()
        self.channel.close()

    def _setup(self, cfg: fed_pb2.TrainingConfig) -> ClientRuntime:
        """The runtime for this training config (rebuilt, with fresh memory, only when it changes)."""
        key = cfg.SerializeToString(deterministic=True).hex()
        if key != self.task_key or self.runtime is None:
            try:  # everything here comes from the coordinator: a failure is its config's fault
                self.runtime, self.data = self._build(cfg)
            except TaskRefused as err:
                raise ClientError(f"refusing the coordinator's task: {err}") from None
            # BadTrainingConfig, TaskError, SpecError, PartitionError; a task's own TypeError or
            # RuntimeError on arguments it cannot take (digits-mlp with hidden=-1)
            except (ValueError, TypeError, RuntimeError, MemoryError) as err:
                raise ClientError(f"unusable training config from the coordinator: {err}") from None
            self.memory, self.last_request, self.task_key = ClientMemory(), None, key
        return self.runtime

    def _build(self, cfg: fed_pb2.TrainingConfig) -> tuple[ClientRuntime, ClientData]:
        assert self.shard is not None
        config = LocalTrainingConfig.from_pb(cfg)
        # --seed shifts this client's own randomness; 0 keeps the job's (what the simulation draws)
        local = dataclasses.replace(config, seed=config.seed + int(getattr(self.args, "seed", 0) or 0))
        # --local-steps: fixed-work mode whatever the coordinator asks (its round times then reveal no shard size)
        local = dataclasses.replace(local, steps=int(getattr(self.args, "local_steps", 0) or local.steps))
        runtime = ClientRuntime(
            local, checks=self.checks, noise_keys=self.noise_keys, task_checks=[self.limits.check_model]
        )
        if isinstance(runtime.trainer, SGDTrainer):
            runtime.trainer.max_seconds = self.limits.max_round_seconds
        data = iid_shard(runtime.task, self.shard[0], self.shard[1], config.seed)
        self.limits.check_steps(data.num_examples, local)
        if runtime.dp_stage is not None:
            data.digest  # noqa: B018  # hashed once per job, not in every round (cached on the data)
        return runtime, data

    def fetch_model(self, task: fed_pb2.PullTaskResponse) -> None:
        """Download and decode the task's global model unless the runtime holds it already. The announced
        size is bounded by the task's own model before the first chunk, and checked chunk by chunk."""
        assert self.runtime is not None
        version = task.model_version
        if self.runtime.has_global(version):
            return
        check_download(task, self.runtime.expected.max_bytes)
        data = bytearray()
        for i in range(task.num_chunks):
            chunk = self._rpc("GetModel", fed_pb2.GetModelRequest(version=version, chunk=i))
            check_chunk(chunk, task, i, len(data) + len(chunk.data))
            data += chunk.data
        if len(data) != task.model_bytes:
            raise ClientError(f"model v{version}: got {len(data)} bytes, announced {task.model_bytes}")
        try:
            self.runtime.load_global(version, bytes(data))
        except ValueError as err:  # ModelMismatch names the tensor and what is wrong with it
            raise ClientError(f"model v{version} from the coordinator: {err}") from None

    def train_round(self, task: fed_pb2.PullTaskResponse) -> fed_pb2.SubmitUpdateRequest:
        """This round's update: trained now, or the one already built for it (resent unchanged)."""
        runtime = self._setup(task.config)
        last = self.last_request
        if self.memory.already_trained(task.round) and last is not None and last.round == task.round:
            return last
        self.fetch_model(task)
        self._charge(runtime, task)
        assert self.data is not None
        try:
            out = runtime.train_round(
                client=self.client_id, round=task.round, model_version=task.model_version, data=self.data,
                memory=self.memory,
            )  # fmt: skip
        except RoundTooLong as err:
            raise ClientError(f"refusing round {task.round}: {err} (--max-round-seconds)") from None
        self.memory, self.last_request, self.last_secure = out.memory, out.request, out.secure_input
        return out.request

    def _charge(self, runtime: ClientRuntime, task: fed_pb2.PullTaskResponse) -> None:
        """Record this release in the client's own ledger before training; past --max-epsilon, refuse it."""
        dp = runtime.dp_stage
        if dp is None or dp.sigma <= 0 or dp.mechanism != "gaussian":
            if self.ledger.max_epsilon is not None:
                raise ClientError(f"--max-epsilon needs a Gaussian dp stage with noise; spec {runtime.config.spec!r}")
            return
        assert self.data is not None
        key = runtime.noise_key_for(self.client_id, task.round, task.model_version, self.data)
        try:
            eps = self.ledger.charge(release_id(key), dp.sigma)
        except BudgetSpent as err:
            raise ClientError(f"refusing round {task.round}: {err}") from None
        self.log(f"round {task.round}: epsilon {eps:.3f} (delta {self.ledger.delta:g}) over this client's releases")

    def _pad(self, started: float, round: int) -> None:
        """--pad-round-seconds: submit no earlier than that long after the task arrived, so the round's
        time shows the coordinator the padding, not how long this client's data took."""
        pad = float(getattr(self.args, "pad_round_seconds", 0.0) or 0.0)
        left = started + pad - time.monotonic()
        if left > 0:
            time.sleep(left)
        elif pad > 0:
            self.log(f"round {round} took {pad - left:.2f} s, past --pad-round-seconds {pad:g}: its time shows")

    def submit(self, req: fed_pb2.SubmitUpdateRequest) -> bool:
        try:
            resp = self._rpc("SubmitUpdate", req)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise ClientError(f"coordinator refused the token: {err.details()}") from None
            if is_transient(err):
                raise
            self.log(f"round {req.round}: update refused ({code.name}): {err.details()}")
            return False
        self.rounds_done += 1
        self.log(f"round {req.round}: update accepted ({resp.received} in the round so far)")
        return True

    def secure(self, task: fed_pb2.PullTaskResponse) -> None:
        """Send this round's input through secure aggregation's phases (`client/secure_rounds.py`)."""
        outcome = take_part(lambda r: self._rpc("SecAgg", r), task, self.last_secure, self.on_secure_phase)
        self.rounds_done += outcome == "sent"
        self.log(f"round {task.round}: secure aggregation {outcome}")

    def run(self) -> int:
        """Take part until the coordinator says DONE. Closes the client on every exit path."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> int:
        join = self.join()
        self.start_heartbeat(heartbeat_seconds(join))
        try:
            while True:
                task = self._rpc("PullTask", fed_pb2.PullTaskRequest(client_id=self.client_id))
                check_action(task)
                if task.action == fed_pb2.PullTaskResponse.DONE:
                    self.log(f"job done after {self.rounds_done} rounds: {task.message}")
                    break
                if task.action == fed_pb2.PullTaskResponse.WAIT:
                    time.sleep(wait_seconds(task))
                    continue
                started = time.monotonic()
                try:
                    req = self.train_round(task)
                except grpc.RpcError as err:
                    if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
                        continue  # the model moved on while we fetched it; pull again
                    raise
                self._pad(started, task.round)
                if task.config.HasField("secure"):
                    self.secure(task)
                else:
                    self.submit(req)
        finally:
            self.stop_heartbeat()
        with contextlib.suppress(grpc.RpcError):
            self.stub.Leave(
                fed_pb2.LeaveRequest(client_id=self.client_id, reason="done"), timeout=5, metadata=self.metadata
            )
        return 0


def run_client(args: argparse.Namespace) -> int:
    """Handler of `gradcomp client`."""
    torch.set_num_threads(1)
    for name, default in (("retry_seconds", 60.0), ("rpc_timeout", 30.0), ("quiet", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    memory_ceiling(WorkLimits.from_args(args).max_memory_mib)  # the whole process, so only here
    try:
        client = FLClient(args)
        for warning in client.warnings:
            print(f"gradcomp client: warning: {warning}", file=sys.stderr)
        return client.run()
    except ClientError as err:
        print(f"gradcomp client: error: {printable(err)}", file=sys.stderr)
        return 3
    except grpc.RpcError as err:
        print(
            f"gradcomp client: coordinator unreachable or failing: {err.code().name}: {printable(err.details())}",
            file=sys.stderr,
        )
        return 4
