"""`gradcomp client`: a federated participant.

Loop: join -> pull task -> (TRAIN) fetch the global model in chunks (cached by version),
train `local_epochs` on this client's shard, update = local - global, compress every tensor
with the job's pipeline (error-feedback memory lives in this process across rounds), submit
-> ... until the coordinator says DONE, then leave and exit 0.

Transient gRPC errors (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff
and jitter for up to --retry-seconds, which also rides out a coordinator restart (`gradcomp
serve --resume`). A refused update (stale round, duplicate, ...) is logged and the client
pulls the next task.

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
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.compression import Pipeline, build, to_fields
from gradcomp.protocol.codec import deserialize_model, fields_to_pb
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.tasks import Task, load_task

log = logging.getLogger("gradcomp.client")

TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
MAX_MESSAGE = 256 * 1024 * 1024  # the client accepts what the coordinator's limits allow
# Reconnect to a restarted coordinator within about a second (see module docstring).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ClientError(RuntimeError):
    """A non-retryable failure (bad token, protocol mismatch, retries exhausted)."""


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
                if code not in TRANSIENT:
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


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/3), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_indices(num_examples: int, index: int, num_shards: int, seed: int) -> list[int]:
    """IID shard: a seeded permutation dealt round-robin (same on every client for the same seed)."""
    perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return perm[index::num_shards].tolist()


def local_train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, momentum: float) -> tuple[float, int]:
    """Plain local SGD (heavy-ball momentum, as torch.optim.SGD with dampening 0); returns (mean loss of
    the last epoch, examples seen per epoch). Written out because the first `torch.optim` optimizer in a
    process imports torch._dynamo, sympy and torch.distributed (~3 s of CPU per client start)."""
    params = [p for p in model.parameters() if p.requires_grad]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            for p in params:
                p.grad = None
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                for i, p in enumerate(params):
                    if p.grad is None:
                        continue
                    step = p.grad
                    if momentum:
                        buf = bufs[i]
                        step = bufs[i] = step.clone() if buf is None else buf.mul_(momentum).add_(step)
                    p.add_(step, alpha=-lr)
            loss_sum += float(loss.detach()) * int(y.numel())
            seen += int(y.numel())
    return loss_sum / max(seen, 1), seen


class FLClient:
    """One participant; `run()` returns when the job is done."""

    def __init__(self, args: argparse.Namespace):
        if not args.token:
            raise ValueError("no token: pass --token or set $GRADCOMP_TOKEN")
        self.args = args
        self.timeout = float(getattr(args, "rpc_timeout", 30.0))
        self.backoff = Backoff(float(getattr(args, "retry_seconds", 60.0)))
        self.metadata = (("authorization", f"Bearer {args.token}"),)
        self.client_id = args.client_id or f"{socket.gethostname()}-{os.getpid()}"
        self._creds = None
        if args.tls_ca or args.tls_cert:
            from gradcomp.protocol.channel import channel_credentials

            self._creds = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        self.shard = _parse_shard(args.shard)  # before the channel opens, so a bad --shard leaks nothing
        self.channel, self.stub = self._open()
        self.task: Task | None = None
        self.task_key: str | None = None
        self.model: nn.Module | None = None
        self.pipe: Pipeline | None = None
        self.global_version: int | None = None
        self.global_params: dict[str, torch.Tensor] = {}
        self.rounds_done = 0
        self._stop = threading.Event()
        self._beat_lock = threading.Lock()
        self._beat_call: grpc.Future | None = None
        self._beat_thread: threading.Thread | None = None
        self.log = (
            (lambda msg: print(f"[client {self.client_id}] {msg}", flush=True))
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
            self.shard = (resp.shard_index, resp.num_shards)
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

    def _setup(self, cfg: fed_pb2.TrainingConfig) -> None:
        key = cfg.SerializeToString(deterministic=True).hex()
        if key == self.task_key:
            return
        assert self.shard is not None
        self.task = load_task(cfg.task, **json.loads(cfg.task_args_json or "{}"))
        self.model = self.task.make_model()
        # Each client draws its own DP noise / random selection: seed from the job seed and the client name.
        seed = (self.args.seed or 0) * 1_000_003 + zlib.crc32(self.client_id.encode()) + cfg.seed
        self.pipe = build(cfg.compression, seed=seed)
        idx = shard_indices(len(self.task.train_set), self.shard[0], self.shard[1], cfg.seed)
        self.shard_set = Subset(self.task.train_set, idx)
        self.task_key = key

    def fetch_model(self, version: int, num_chunks: int, total: int) -> None:
        if version == self.global_version:
            return
        parts = []
        for i in range(num_chunks):
            chunk = self._rpc("GetModel", fed_pb2.GetModelRequest(version=version, chunk=i))
            parts.append(chunk.data)
        data = b"".join(parts)
        if len(data) != total:
            raise ClientError(f"model v{version}: got {len(data)} bytes, announced {total}")
        got, params = deserialize_model(data)
        if got != version:
            raise ClientError(f"asked for model v{version}, received v{got}")
        self.global_params, self.global_version = params, version

    def train_round(self, task: fed_pb2.PullTaskResponse) -> fed_pb2.SubmitUpdateRequest:
        cfg = task.config
        self._setup(cfg)
        self.fetch_model(task.model_version, task.num_chunks, task.model_bytes)
        assert self.model is not None and self.pipe is not None
        self.model.load_state_dict(self.global_params, strict=False)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + task.round + zlib.crc32(self.client_id.encode()))
        loader = DataLoader(self.shard_set, batch_size=cfg.batch_size, shuffle=True, generator=gen)
        t0 = time.perf_counter()
        loss, seen = local_train(self.model, loader, cfg.local_epochs, cfg.lr, cfg.momentum)
        local = self.model.state_dict()
        req = fed_pb2.SubmitUpdateRequest(
            client_id=self.client_id, round=task.round, model_version=task.model_version, num_examples=seen
        )
        for name, g in self.global_params.items():
            delta = local[name].detach().float() - g
            payload = self.pipe.compress(delta, key=name)
            nt = req.update.add(name=name)
            fields_to_pb(to_fields(payload), nt.tensor)
        req.metrics["train_loss"] = loss
        req.metrics["train_seconds"] = time.perf_counter() - t0
        return req

    def submit(self, req: fed_pb2.SubmitUpdateRequest) -> bool:
        try:
            resp = self._rpc("SubmitUpdate", req)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise ClientError(f"coordinator refused the token: {err.details()}") from None
            if code in TRANSIENT:
                raise
            self.log(f"round {req.round}: update refused ({code.name}): {err.details()}")
            return False
        self.rounds_done += 1
        self.log(f"round {req.round}: update accepted ({resp.received} in the round so far)")
        return True

    def run(self) -> int:
        """Take part until the coordinator says DONE. Closes the client on every exit path."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> int:
        join = self.join()
        self.start_heartbeat(join.heartbeat_seconds)
        try:
            while True:
                task = self._rpc("PullTask", fed_pb2.PullTaskRequest(client_id=self.client_id))
                if task.action == fed_pb2.PullTaskResponse.DONE:
                    self.log(f"job done after {self.rounds_done} rounds: {task.message}")
                    break
                if task.action == fed_pb2.PullTaskResponse.WAIT:
                    time.sleep(max(0.02, task.retry_after_seconds))
                    continue
                try:
                    req = self.train_round(task)
                except grpc.RpcError as err:
                    if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
                        continue  # the model moved on while we fetched it; pull again
                    raise
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
    try:
        return FLClient(args).run()
    except ClientError as err:
        print(f"gradcomp client: error: {err}", file=sys.stderr)
        return 3
    except grpc.RpcError as err:
        print(
            f"gradcomp client: coordinator unreachable or failing: {err.code().name}: {err.details()}", file=sys.stderr
        )
        return 4
