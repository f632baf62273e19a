"""A hostile coordinator (or whoever answers on its address) against the real `gradcomp client`.

A fake coordinator (a real gRPC server on 127.0.0.1 with the protocol's servicer) answers Join,
PullTask and GetModel with one malformed field each (an oversized shape, too many chunks, a wrong
version, a non-finite number, ...). Each must end the
client with a `ClientError` that names what was wrong, before anything is allocated from a shape
the coordinator declared, and with no update sent back. The honest answers train and submit once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.client.grpc_client import ClientError, FLClient
from gradcomp.config.fed import FedJob
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import iid_shard
from gradcomp.fedclient.train import SGDTrainer
from gradcomp.protocol.codec import serialize_model
from gradcomp.protocol.messages import training_config
from gradcomp.protocol.model import initial_params
from gradcomp.tasks import load_task

JOB = FedJob.model_validate({"task": {"name": "digits-mlp", "args": {"hidden": 16}}, "compression": "topk(ratio=0.1)"})
PARAMS = initial_params(load_task("digits-mlp", hidden=16), JOB.seed)  # 0.weight [16, 64], 0.bias, 2.weight, 2.bias
CHUNK = 1024  # the smallest chunk a job may use: the model (~5 KB) takes several
Edit = Callable[[fed_pb2.ModelWeights], None]
Train = fed_pb2.PullTaskResponse


def model_bytes(edit: Edit | None = None, version: int = 0) -> bytes:
    msg = fed_pb2.ModelWeights()
    msg.ParseFromString(serialize_model(PARAMS, version))
    if edit is not None:
        edit(msg)
    return msg.SerializeToString()


@dataclass
class Scenario:
    """What the fake coordinator answers: the join, the first task (then DONE), the model and its chunking."""

    join: fed_pb2.JoinResponse = field(
        default_factory=lambda: fed_pb2.JoinResponse(client_name="c0", job_name="j", num_shards=2, heartbeat_seconds=5)
    )
    task: fed_pb2.PullTaskResponse = field(default_factory=lambda: train_task(model_bytes()))
    model: bytes = field(default_factory=model_bytes)
    tamper_chunk: Callable[[fed_pb2.ModelChunk], None] | None = None
    pulls: int = 0
    submitted: list[fed_pb2.SubmitUpdateRequest] = field(default_factory=list)


def train_task(model: bytes, **config: object) -> fed_pb2.PullTaskResponse:
    cfg = training_config(JOB)
    for key, value in config.items():
        setattr(cfg, key, value)
    return Train(action=Train.TRAIN, round=1, model_version=0, model_bytes=len(model),
                 num_chunks=math.ceil(len(model) / CHUNK), config=cfg)  # fmt: skip


class FakeCoordinator(fed_pb2_grpc.CoordinatorServicer):
    """Answers whatever the current `Scenario` says; records every update it is sent."""

    def __init__(self) -> None:
        self.scenario = Scenario()

    def Join(self, request: fed_pb2.JoinRequest, context: grpc.ServicerContext) -> fed_pb2.JoinResponse:
        return self.scenario.join

    def PullTask(self, request: fed_pb2.PullTaskRequest, context: grpc.ServicerContext) -> Train:
        self.scenario.pulls += 1
        return self.scenario.task if self.scenario.pulls == 1 else Train(action=Train.DONE, message="over")

    def GetModel(self, request: fed_pb2.GetModelRequest, context: grpc.ServicerContext) -> fed_pb2.ModelChunk:
        s = self.scenario
        piece = s.model[request.chunk * CHUNK : (request.chunk + 1) * CHUNK]
        chunk = fed_pb2.ModelChunk(version=request.version, chunk=request.chunk, num_chunks=s.task.num_chunks,
                                   total_bytes=s.task.model_bytes, data=piece)  # fmt: skip
        if s.tamper_chunk is not None:
            s.tamper_chunk(chunk)
        return chunk

    def SubmitUpdate(self, request: fed_pb2.SubmitUpdateRequest, context: grpc.ServicerContext) -> object:
        self.scenario.submitted.append(request)
        return fed_pb2.SubmitUpdateResponse(accepted=True, round=request.round, received=1)

    def Heartbeat(self, request: fed_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> object:
        return fed_pb2.HeartbeatResponse()

    def Leave(self, request: fed_pb2.LeaveRequest, context: grpc.ServicerContext) -> object:
        return fed_pb2.LeaveResponse()


def serve_fake() -> Iterator[tuple[FakeCoordinator, int]]:
    """A `FakeCoordinator` on a real gRPC server on 127.0.0.1: (the fake, its port) until closed."""
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fed_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, port
    server.stop(None).wait()


@pytest.fixture(scope="module")
def coordinator() -> Iterator[tuple[FakeCoordinator, int]]:
    yield from serve_fake()


def run_client(coordinator: tuple[FakeCoordinator, int], scenario: Scenario) -> int:
    fake, port = coordinator
    fake.scenario = scenario
    args = argparse.Namespace(
        server=f"127.0.0.1:{port}", token="t" * 12, client_id="c0", shard=None, tls_ca=None, tls_cert=None,
        tls_key=None, seed=0, retry_seconds=2.0, rpc_timeout=5.0, quiet=True,
    )  # fmt: skip
    return FLClient(args).run()


@pytest.mark.server
def test_the_honest_answers_train_and_submit_once(coordinator: tuple[FakeCoordinator, int]) -> None:
    scenario = Scenario()
    assert run_client(coordinator, scenario) == 0
    assert len(scenario.submitted) == 1 and scenario.submitted[0].round == 1
    assert {t.name for t in scenario.submitted[0].update} == set(PARAMS)


def _tensor(msg: fed_pb2.ModelWeights, name: str) -> fed_pb2.Tensor:
    return next(t.tensor for t in msg.tensors if t.name == name)


def _set_shape(name: str, shape: list[int], kind: int | None = None) -> Edit:
    def edit(msg: fed_pb2.ModelWeights) -> None:
        tensor = _tensor(msg, name)
        del tensor.shape[:]
        tensor.shape.extend(shape)
        if kind is not None:  # a sparse tensor with no values: every element zero, once allocated
            tensor.kind, tensor.index_dtype, tensor.values, tensor.indices = kind, 16, b"", b""

    return edit


def _extra(msg: fed_pb2.ModelWeights) -> None:
    msg.tensors.add(name="evil").tensor.CopyFrom(_tensor(msg, "2.bias"))


def _renamed(msg: fed_pb2.ModelWeights) -> None:
    msg.tensors[3].name = "evil"  # was 2.bias


def _missing(msg: fed_pb2.ModelWeights) -> None:
    del msg.tensors[3]  # 2.bias


def _twice(msg: fed_pb2.ModelWeights) -> None:
    msg.tensors.add(name="2.bias").tensor.CopyFrom(_tensor(msg, "2.bias"))
    del msg.tensors[2]  # 2.weight gone, so the size stays within the task model's


def _nan(msg: fed_pb2.ModelWeights) -> None:
    tensor = _tensor(msg, "2.bias")
    tensor.values = b"\x00\x00\xc0\x7f" + tensor.values[4:]  # float32 NaN first


def _float64(msg: fed_pb2.ModelWeights) -> None:
    tensor = _tensor(msg, "2.bias")
    tensor.dtype = tensor.value_dtype = 4


FROM = "model v0 from the coordinator: "
MODEL_ATTACKS = {
    "sparse [2^40] without values": (
        _set_shape("0.weight", [2**40], kind=1),
        FROM + "tensor '0.weight' has payload kind 1; a global model is dense",
    ),
    "dense [2^40] without values": (
        _set_shape("0.weight", [2**40]),
        FROM + r"tensor '0.weight' has shape \[1099511627776\]",
    ),
    "wrong shape": (
        _set_shape("0.weight", [64, 16]),
        r"'0.weight' has shape \[64, 16\]; the task's model has \[16, 64\]",
    ),
    "extra tensor": (_extra, r"^model v0: announced \d+ bytes; the task's model takes 1 to \d+$"),
    "renamed tensor": (
        _renamed,
        FROM + r"model tensors differ .*missing \['2.bias'\], not in the task's model \['evil'\]",
    ),
    "missing tensor": (_missing, FROM + r"model tensors differ .*missing \['2.bias'\], not in the task's model \[\]"),
    "tensor twice": (_twice, FROM + "tensor '2.bias' appears twice"),
    "NaN value": (_nan, FROM + "tensor '2.bias' holds NaN or infinite values"),
    "float64 tensor": (
        _float64,
        FROM + r"tensor '2.bias' has dtype code 4 \(values 4\); the task's model has torch.float32",
    ),
    "wrong version": (lambda msg: setattr(msg, "version", 7), FROM + "model bytes hold version 7, expected 0"),
}


@pytest.mark.parametrize("attack", MODEL_ATTACKS)
@pytest.mark.server
def test_a_malformed_model_is_refused_and_nothing_is_sent(
    coordinator: tuple[FakeCoordinator, int], attack: str
) -> None:
    edit, problem = MODEL_ATTACKS[attack]
    model = model_bytes(edit)
    scenario = Scenario(task=train_task(model), model=model)
    with pytest.raises(ClientError, match=problem):
        run_client(coordinator, scenario)
    assert scenario.submitted == []


def test_the_trainer_itself_refuses_params_missing_a_tensor() -> None:
    """Behind the decode check, local training no longer loads with strict=False and trains the rest."""
    task = load_task("digits-mlp", hidden=16)
    cfg = LocalTrainingConfig.from_pb(training_config(JOB))
    params = {k: v for k, v in PARAMS.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"global params miss \['2.bias'\]"):
        SGDTrainer(task.make_model()).train(params, iid_shard(task, 0, 2, 0), cfg, seed=0)


def _honest_task(**kw: object) -> fed_pb2.PullTaskResponse:
    task = train_task(model_bytes())
    for key, value in kw.items():
        setattr(task, key, value)
    return task


def _chunk(**kw: object) -> Callable[[fed_pb2.ModelChunk], None]:
    return lambda chunk: [setattr(chunk, k, v) for k, v in kw.items()] and None


ANSWER_ATTACKS = {
    "task_args_json '[]'": (dict(task=train_task(model_bytes(), task_args_json="[]")), "must be a JSON object"),
    "task_args_json '{bad'": (dict(task=train_task(model_bytes(), task_args_json="{bad")), "is not JSON"),
    "task_args of the wrong type": (
        dict(task=train_task(model_bytes(), task_args_json=json.dumps({"hidden": "x"}))),
        "unusable training config.*must be tuple of ints",
    ),
    "batch_size 0": (dict(task=train_task(model_bytes(), batch_size=0)), "batch_size must be >= 1, got 0"),
    "local_epochs 0": (dict(task=train_task(model_bytes(), local_epochs=0)), "local_epochs must be >= 1"),
    "lr NaN": (dict(task=train_task(model_bytes(), lr=math.nan)), "lr must be a finite number > 0, got nan"),
    "momentum 1.5": (dict(task=train_task(model_bytes(), momentum=1.5)), r"momentum must be in \[0, 1\)"),
    "compression spec": (dict(task=train_task(model_bytes(), compression="topk(ratio=7")), "unusable training config"),
    "num_chunks 2^32-1": (dict(task=_honest_task(num_chunks=2**32 - 1)), "announced 4294967295 chunks for"),
    "num_chunks 0": (dict(task=_honest_task(num_chunks=0)), "announced 0 chunks"),
    "model_bytes beyond the model": (dict(task=_honest_task(model_bytes=2**40)), "announced 1099511627776 bytes"),
    "oversized chunk": (dict(tamper_chunk=_chunk(data=b"\0" * 8192)), "8192 bytes received, more than the"),
    "chunk of another version": (dict(tamper_chunk=_chunk(version=3)), "sent chunk 0 of v3"),
    "heartbeat 0": (dict(join=fed_pb2.JoinResponse(num_shards=1, heartbeat_seconds=0)), "heartbeat_seconds=0.0"),
    "heartbeat NaN": (dict(join=fed_pb2.JoinResponse(num_shards=1, heartbeat_seconds=math.nan)), "=nan is outside"),
    "heartbeat 1e9": (dict(join=fed_pb2.JoinResponse(num_shards=1, heartbeat_seconds=1e9)), "=1000000000.0 is"),
    "shard beyond num_shards": (
        dict(join=fed_pb2.JoinResponse(shard_index=5, num_shards=2, heartbeat_seconds=5)),
        "assigned shard 5 of 2",
    ),
    "no shards": (dict(join=fed_pb2.JoinResponse(num_shards=0, heartbeat_seconds=5)), "assigned shard 0 of 0"),
    "unknown action": (dict(task=Train(action=7)), "task action 7 is none of"),  # type: ignore[arg-type]
    "retry_after NaN": (dict(task=Train(action=Train.WAIT, retry_after_seconds=math.nan)), "retry_after_seconds=nan"),
}


@pytest.mark.parametrize("attack", ANSWER_ATTACKS)
@pytest.mark.server
def test_a_malformed_answer_is_refused_and_nothing_is_sent(
    coordinator: tuple[FakeCoordinator, int], attack: str
) -> None:
    fields, problem = ANSWER_ATTACKS[attack]
    scenario = Scenario(**fields)  # type: ignore[arg-type]
    with pytest.raises(ClientError, match=problem):
        run_client(coordinator, scenario)
    assert scenario.submitted == []


CHILD = """
import resource, sys
from gradcomp.cli import main
rc = main(sys.argv[1:])
print(f"maxrss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.server
def test_gradcomp_client_exits_3_without_allocating_a_declared_sparse_tensor(
    coordinator: tuple[FakeCoordinator, int], tmp_path: Path
) -> None:
    """The CLI end to end: a 1 GiB all-zero sparse tensor (2^28 float32) is refused by its kind and shape alone."""
    fake, port = coordinator
    model = model_bytes(_set_shape("0.weight", [2**28], kind=1))
    fake.scenario = scenario = Scenario(task=train_task(model), model=model)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src, GRADCOMP_TOKEN="t" * 12, HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "client", "--server", f"127.0.0.1:{port}", "--client-id", "c0", "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "gradcomp client: error: model v0 from the coordinator: tensor '0.weight' has payload kind 1" in proc.stderr
    peak_mib = int(proc.stderr.rsplit("maxrss_kib=", 1)[1]) / 1024
    assert peak_mib < 900, f"the client peaked at {peak_mib:.0f} MiB: it allocated the declared tensor"
    assert scenario.submitted == []
