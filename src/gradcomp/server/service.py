"""The gRPC servicer: authentication, protobuf <-> core types, status codes, RPC metrics.

All round logic lives in `server.core.Coordinator`; this module only translates. Every
refusal carries a precise status code and a message that says what was wrong:

  bad/missing token, or a client certificate that is not the token's   UNAUTHENTICATED
  request that does not parse INVALID_ARGUMENT (both checked by server.auth.AuthGate first)
  stale round, not selected   FAILED_PRECONDITION (the client should pull a new task)
  job over                    FAILED_PRECONDITION
  duplicate submit            ALREADY_EXISTS
  update over the size limit  RESOURCE_EXHAUSTED
  malformed / wrong shape / wrong dtype / NaN or Inf   INVALID_ARGUMENT
  unknown model version       NOT_FOUND;  chunk index out of range  OUT_OF_RANGE
  SecAgg: a phase not open, an attempt that is over, an update sent in the clear   FAILED_PRECONDITION;
  a message that does not decode, is over its phase's size or names another client   INVALID_ARGUMENT;
  a second answer in one phase   ALREADY_EXISTS   (server/secure_session.py)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc

from gradcomp import metrics
from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.config.fed import FedJob
from gradcomp.protocol.messages import PROTOCOL_VERSION, DuplicateTensor, training_config, update_fields
from gradcomp.server.auth import TokenBook
from gradcomp.server.core import Coordinator
from gradcomp.server.model_cache import ModelCache
from gradcomp.server.secure_rounds import SecureRounds
from gradcomp.server.secure_session import StepRefused
from gradcomp.server.updates import Rejected

log = logging.getLogger("gradcomp.server")

# The coordinator's task actions ("wait" | "train" | "done") as the wire enum.
PULL_ACTIONS: dict[str, fed_pb2.PullTaskResponse.Action] = {
    "wait": fed_pb2.PullTaskResponse.WAIT,
    "train": fed_pb2.PullTaskResponse.TRAIN,
    "done": fed_pb2.PullTaskResponse.DONE,
}

REASON_CODES: dict[str, grpc.StatusCode] = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "stale_round": grpc.StatusCode.FAILED_PRECONDITION,
    "not_selected": grpc.StatusCode.FAILED_PRECONDITION,
    "job_done": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_shape": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_dtype": grpc.StatusCode.INVALID_ARGUMENT,
    "non_finite": grpc.StatusCode.INVALID_ARGUMENT,
}


STEP_CODES: dict[str, grpc.StatusCode] = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
}
SECAGG_STATES: dict[str, fed_pb2.SecAggResponse.State] = {
    "wait": fed_pb2.SecAggResponse.WAIT,
    "ready": fed_pb2.SecAggResponse.READY,
    "dropped": fed_pb2.SecAggResponse.DROPPED,
    "aborted": fed_pb2.SecAggResponse.ABORTED,
}


class RpcError(Exception):
    """Raised inside a handler; the wrapper turns it into `context.abort(code, message)`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _rpc(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(self: CoordinatorService, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                out = fn(self, request, context)
            except RpcError as err:
                metrics.FED_RPCS.labels(method=method, code=err.code.name).inc()
                context.abort(err.code, str(err))
            except Exception as err:
                log.exception("%s failed", method)
                metrics.FED_RPCS.labels(method=method, code="INTERNAL").inc()
                context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error: {type(err).__name__}")
            metrics.FED_RPCS.labels(method=method, code="OK").inc()
            return out

        return wrapper

    return deco


class CoordinatorService(fed_pb2_grpc.CoordinatorServicer):
    """gRPC face of a `Coordinator`; `book` says which client a bearer token names."""

    def __init__(self, coord: Coordinator, job: FedJob, book: TokenBook, cache: ModelCache | None = None):
        self.coord = coord
        self.job = job
        self.book = book
        self.cache = cache or ModelCache(job.limits.chunk_bytes)
        plan = coord.secure_plan
        self.secure = SecureRounds(coord) if plan is not None else None
        self._config = training_config(job, plan.encoding, plan.params) if plan is not None else training_config(job)

    # --- helpers ---------------------------------------------------------------------------
    def _client(self, context: grpc.ServicerContext) -> str | None:
        ident = self.book.lookup(context.invocation_metadata())
        return ident.name if ident else None

    def _auth(self, context: grpc.ServicerContext) -> str:
        name = self._client(context)
        if name is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        return name

    # --- RPCs -------------------------------------------------------------------------------
    @_rpc("Join")
    def Join(self, request: fed_pb2.JoinRequest, context: grpc.ServicerContext) -> fed_pb2.JoinResponse:
        name = self._auth(context)
        if request.protocol_version not in (0, PROTOCOL_VERSION):
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"client speaks protocol {request.protocol_version}; this coordinator speaks {PROTOCOL_VERSION}",
            )
        info = self.coord.register(name)
        return fed_pb2.JoinResponse(
            client_name=name,
            job_name=self.job.name,
            shard_index=info.shard_index,
            num_shards=info.num_shards,
            heartbeat_seconds=self.job.server.heartbeat_seconds,
        )

    @_rpc("PullTask")
    def PullTask(self, request: fed_pb2.PullTaskRequest, context: grpc.ServicerContext) -> fed_pb2.PullTaskResponse:
        name = self._auth(context)
        task = self.coord.task_for(name)
        resp = fed_pb2.PullTaskResponse(
            action=PULL_ACTIONS[task.action],
            round=task.round,
            model_version=task.model_version,
            retry_after_seconds=task.retry_after,
            deadline_seconds=task.deadline_in,
            message=task.message,
        )
        if task.action == "train" and self.secure is not None:
            s = self.secure.session()
            if s is None or not s.may_train(name):  # this attempt is past training for this client
                return fed_pb2.PullTaskResponse(action=fed_pb2.PullTaskResponse.WAIT, round=task.round,
                                                retry_after_seconds=0.2)  # fmt: skip
            resp.secure_session, resp.secure_id = s.session, s.ids[name]
        if task.action == "train":
            version, params = self.coord.snapshot()
            if version != task.model_version:  # a round closed in between; ask again shortly
                return fed_pb2.PullTaskResponse(
                    action=fed_pb2.PullTaskResponse.WAIT, round=version + 1, retry_after_seconds=0.05
                )
            data = self.cache.get(version, params)
            assert data is not None
            resp.model_bytes = len(data)
            resp.num_chunks = self.cache.num_chunks(len(data))
            resp.config.CopyFrom(self._config)
        return resp

    @_rpc("GetModel")
    def GetModel(self, request: fed_pb2.GetModelRequest, context: grpc.ServicerContext) -> fed_pb2.ModelChunk:
        self.coord.touch(self._auth(context))
        data = self.cache.get(request.version)
        if data is None:
            version, params = self.coord.snapshot()
            if version != request.version:
                raise RpcError(
                    grpc.StatusCode.NOT_FOUND, f"model version {request.version} unknown (current {version})"
                )
            data = self.cache.get(version, params)
            assert data is not None
        n = self.cache.num_chunks(len(data))
        if request.chunk >= n:
            raise RpcError(grpc.StatusCode.OUT_OF_RANGE, f"chunk {request.chunk} of a {n}-chunk model")
        piece = self.cache.chunk(data, request.chunk)
        metrics.FED_DOWNLINK_BYTES.inc(len(piece))
        metrics.FED_DOWNLINK_DENSE_BYTES.inc(len(piece))
        return fed_pb2.ModelChunk(
            version=request.version, chunk=request.chunk, num_chunks=n, total_bytes=len(data), data=piece
        )

    @_rpc("SubmitUpdate")
    def SubmitUpdate(
        self, request: fed_pb2.SubmitUpdateRequest, context: grpc.ServicerContext
    ) -> fed_pb2.SubmitUpdateResponse:
        name = self._client(context)
        if name is None:
            err = self.coord.reject("unauthenticated", "missing or unknown bearer token")
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, str(err))
        if self.secure is not None:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "this job runs secure aggregation: the coordinator "
                           "takes no update in the clear; send it through the SecAgg RPC")  # fmt: skip
        try:
            update = update_fields(request)
        except DuplicateTensor as dup:
            err = self.coord.reject("malformed", str(dup))
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        try:
            received = self.coord.accept_update(
                name, request.round, request.num_examples, update, dict(request.metrics),
                model_version=request.model_version,
            )  # fmt: skip
        except Rejected as err:
            raise RpcError(REASON_CODES[err.reason], f"{err.reason}: {err}") from None
        return fed_pb2.SubmitUpdateResponse(accepted=True, round=request.round, received=received)

    @_rpc("Heartbeat")
    def Heartbeat(self, request: fed_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> fed_pb2.HeartbeatResponse:
        name = self._auth(context)
        self.coord.touch(name)
        return fed_pb2.HeartbeatResponse(round=self.coord.version, done=self.coord.done)

    @_rpc("SecAgg")
    def SecAgg(self, request: fed_pb2.SecAggRequest, context: grpc.ServicerContext) -> fed_pb2.SecAggResponse:
        name = self._auth(context)
        self.coord.touch(name)
        if self.secure is None:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "this job does not run secure aggregation")
        try:
            s = self.secure.lookup(request.session, request.round)
            if request.message:
                reply = s.answer(name, int(request.phase), request.message)
            else:
                reply = s.poll(name, int(request.phase))
        except StepRefused as err:
            raise RpcError(STEP_CODES[err.code], str(err)) from None
        self.secure.settle(s)
        return fed_pb2.SecAggResponse(state=SECAGG_STATES[reply.state], message=reply.message,
                                      retry_after_seconds=reply.retry_after, detail=reply.detail)  # fmt: skip

    @_rpc("Leave")
    def Leave(self, request: fed_pb2.LeaveRequest, context: grpc.ServicerContext) -> fed_pb2.LeaveResponse:
        name = self._auth(context)
        self.coord.leave(name)
        return fed_pb2.LeaveResponse()
