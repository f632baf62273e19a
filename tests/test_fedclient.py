"""The client runtime's pieces: the seed key, the shard, the checks hook, memory between rounds."""

from __future__ import annotations

import argparse

import pytest
import torch

from gradcomp.client.grpc_client import ClientError, FLClient
from gradcomp.compression import from_fields
from gradcomp.config.fed import FedJob
from gradcomp.fedclient.config import LocalTrainingConfig, TaskRefused
from gradcomp.fedclient.data import dataset_view, iid_shard
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.fedclient.seeds import round_seed
from gradcomp.partition import partition
from gradcomp.protocol.codec import serialize_model
from gradcomp.protocol.messages import training_config, update_fields
from gradcomp.protocol.model import initial_params
from gradcomp.tasks import load_task

JOB = FedJob.model_validate(
    {"task": {"name": "digits-mlp", "args": {"hidden": 16}}, "compression": "topk(ratio=0.1) | ef", "seed": 4}
)


def test_round_seed_depends_on_job_client_and_round_only() -> None:
    assert round_seed(1, "a", 3) == round_seed(1, "a", 3)
    assert len({round_seed(1, "a", 3), round_seed(2, "a", 3), round_seed(1, "b", 3), round_seed(1, "a", 4)}) == 4
    assert 0 <= round_seed(10**9, "x" * 100, 10**6) < 2**31


def test_a_real_clients_shard_is_the_simulations_iid_part() -> None:
    task = load_task("digits-mlp")
    parts = partition(task.labels().numpy(), 5, "iid", seed=7)
    shard = iid_shard(task, 2, 5, seed=7)
    torch.testing.assert_close(shard.y, dataset_view(task.train_set).y[torch.from_numpy(parts[2].astype("int64"))])


def test_checks_refuse_a_task_before_anything_loads() -> None:
    cfg = LocalTrainingConfig.from_pb(training_config(JOB))
    seen = []

    def allowlist(c: LocalTrainingConfig) -> None:
        seen.append(c.task)
        raise TaskRefused(f"task {c.task!r} is not on this client's allowlist")

    with pytest.raises(TaskRefused, match="allowlist"):
        ClientRuntime(cfg, checks=[allowlist])
    assert seen == ["digits-mlp"]
    args = argparse.Namespace(
        server="127.0.0.1:1", token="t", client_id="c", shard="0/2", tls_ca=None, tls_cert=None, tls_key=None,
        seed=0, retry_seconds=1.0, rpc_timeout=1.0, quiet=True,
    )  # fmt: skip
    client = FLClient(args, checks=[allowlist])
    try:
        with pytest.raises(ClientError, match="refusing the coordinator's task"):
            client._setup(training_config(JOB))
    finally:
        client.close()


def test_error_feedback_memory_carries_to_the_next_round() -> None:
    rt = ClientRuntime(LocalTrainingConfig.from_pb(training_config(JOB)))
    task = rt.task
    rt.load_global(0, serialize_model(initial_params(task, JOB.seed), 0))
    data = iid_shard(task, 0, 4, JOB.seed)
    first = rt.train_round(client="c", round=1, model_version=0, data=data, memory=ClientMemory())
    assert first.memory.last_round == 1 and first.memory.already_trained(1) and not first.memory.already_trained(2)
    assert set(first.memory.residuals) == set(rt.global_params)  # topk | ef: a residual for every tensor
    again = rt.train_round(client="c", round=1, model_version=0, data=data, memory=ClientMemory())
    assert again.request == first.request  # a pure function of (job, client, round, model, data, memory)
    carried = rt.train_round(client="c", round=2, model_version=0, data=data, memory=first.memory)
    fresh = rt.train_round(client="c", round=2, model_version=0, data=data, memory=ClientMemory())
    assert carried.request != fresh.request  # the residual is added back into round 2's update
    sent = {k: from_fields(f).to_dense() for k, f in update_fields(first.request).items()}
    for k, residual in first.memory.residuals.items():  # sent + kept = the whole local - global delta
        torch.testing.assert_close(sent[k].reshape(-1) + residual, _local_delta(rt, data, k), atol=1e-6, rtol=0)


def _local_delta(rt: ClientRuntime, data: object, key: str) -> torch.Tensor:
    result = rt.train("c", 1, data)  # type: ignore[arg-type]
    return (result.params[key].float() - rt.global_params[key]).reshape(-1)
