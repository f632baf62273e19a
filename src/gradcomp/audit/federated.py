"""The federated setting of the audit: each victim batch is one client's shard for one round of the real
client runtime (`fedclient.ClientRuntime`), and the attacker reads its compressed `local - global` from
the `SubmitUpdateRequest` as the coordinator does, scaled to the pseudo-gradient it inverts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from gradcomp._proto import fed_pb2
from gradcomp.audit.config import AuditConfig
from gradcomp.audit.gradients import GroupGradients
from gradcomp.audit.observe import Observation, Setting, Truth, received, victim_groups
from gradcomp.compression import Payload, from_fields
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import dataset_view
from gradcomp.fedclient.noisekey import OneKey
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.fedclient.train import SGDConfig, num_steps
from gradcomp.protocol.codec import serialize_model
from gradcomp.protocol.messages import update_fields
from gradcomp.tasks import Task

GLOBAL_VERSION = 1  # the round's global model version (any; the client only checks it)


@dataclass(frozen=True)
class ClientRound:
    """One victim group's round as its client ran it: what it put on the wire, and the truth."""

    request: fed_pb2.SubmitUpdateRequest
    payloads: dict[str, Payload]  # the compressed update, before encoding
    true: torch.Tensor  # [P] the uncompressed pseudo-gradient -(local - global) / (lr * steps)
    scale: float  # -1 / (lr * steps): update -> pseudo-gradient
    key: bytes  # the round's release key (secure aggregation's rounding and noise)


def client_rounds(task: Task, setting: Setting, spec: str, ids: torch.Tensor, config: AuditConfig) -> list[ClientRound]:
    """Each group of victims in `ids` [G, B] is one client's shard for one round of the real client runtime
    (`ClientRuntime.train` and `build_update`, as `train_round` runs them), from `setting`'s model as the
    global model."""
    local = LocalTrainingConfig(
        task=config.task,
        epochs=config.local_epochs,
        batch_size=config.local_batch_size,
        lr=config.local_lr,
        momentum=0.0,
        spec=spec,
        seed=config.seed,
        task_args=dict(config.task_args),
    )
    key = hashlib.sha256(f"gradcomp-audit-client-{config.seed}".encode()).digest()  # a seeded audit, not a secret
    runtime = ClientRuntime(local, task=task, noise_keys=OneKey(key))
    global_params = {k: v.detach() for k, v in setting.model.named_parameters()}
    runtime.load_global(GLOBAL_VERSION, serialize_model(global_params, GLOBAL_VERSION))
    victims = dataset_view(task.test_set)  # type: ignore[arg-type]
    out = []
    for g, group in enumerate(ids):
        client, data = f"victim-client-{g}", victims.subset(group)
        result = runtime.train(client, GLOBAL_VERSION, data)
        request, payloads, _ = runtime.build_update(
            client, GLOBAL_VERSION, GLOBAL_VERSION, result, ClientMemory(), data
        )
        scale = -1.0 / (config.local_lr * num_steps(data.num_examples, SGDConfig.of(local)))
        true = torch.cat([(result.params[k] - v).reshape(-1) for k, v in global_params.items()]) * scale
        release = runtime.noise_key_for(client, GLOBAL_VERSION, GLOBAL_VERSION, data)
        out.append(ClientRound(request, payloads, true.detach(), scale, release))
    return out


def attacker_view(
    setting: Setting, ids: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor, rounds: list[ClientRound]
) -> tuple[Observation, Truth]:
    """The attacks' observation of the global model's victims [G, B] from the observed pseudo-gradients."""
    params = dict(setting.model.named_parameters())
    grads = GroupGradients(setting.model, params, setting.test_y[ids], setting.objective)
    x = setting.test_x[ids]
    obs = Observation(grads, observed, mask, tuple(x.shape[2:]), setting.bounds)
    true = torch.stack([r.true for r in rounds])
    return obs, Truth(x, ids, true, rounds[0].request.ByteSize())


def federated_observe(
    task: Task, setting: Setting, spec: str, batch: int, config: AuditConfig
) -> tuple[Observation, Truth]:
    """Each group of `batch` victims is one client's round; its compressed `local - global` is read back
    from the request, as the coordinator reads it, and scaled to the pseudo-gradient."""
    ids = victim_groups(setting, batch)
    rounds = client_rounds(task, setting, spec, ids, config)
    names = [k for k, _ in setting.model.named_parameters()]
    observed, mask = [], []
    for r in rounds:
        fields = update_fields(r.request)
        seen = [received(from_fields(fields[k])) for k in names]
        observed.append(torch.cat([values for values, _ in seen]) * r.scale)
        mask.append(torch.cat([sent for _, sent in seen]))
    return attacker_view(setting, ids, torch.stack(observed), torch.stack(mask), rounds)
