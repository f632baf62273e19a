"""The settings the audit attacks each spec in, because a spec's leakage depends on them:

- `init`: one victim batch's mean-loss gradient on the model at its seeded initialisation
  (`observe`), as a DDP bucket or a one-step client update carries it;
- `trained`: the same single gradient on the model trained for `trained_epochs` on the task's
  training set (seeded, cached per process): a trained model's gradients can leak more than an
  untrained one's (sparsifiers keep different coordinates, the loss no longer dominates them);
- `federated`: the real client's round (`fedclient.ClientRuntime`: `local_epochs` of local SGD
  in batches of `local_batch_size` on the victim batch, from the global model at initialisation),
  whose `local - global` update is compressed under the spec as the client compresses it and read
  back from its `SubmitUpdateRequest`. The attacker, who set lr and the local work, inverts it as
  the pseudo-gradient -(local - global) / (lr * steps).

A `Scenario` gives the attacks the model they assume and an `observe(spec, batch)`; the verdict
takes the worst setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gradcomp.audit.config import AuditConfig
from gradcomp.audit.gradients import GroupGradients
from gradcomp.audit.observe import Observation, Setting, Truth, observe, received, victim_groups
from gradcomp.compression import from_fields
from gradcomp.errors import UserError
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import dataset_view
from gradcomp.fedclient.noisekey import OneKey
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.fedclient.train import SGDConfig, num_steps, train_one
from gradcomp.protocol.codec import serialize_model
from gradcomp.protocol.messages import update_fields
from gradcomp.tasks import Task

SETTINGS = ("init", "trained", "federated")
# How the `trained` model is trained (centralised SGD, the digits examples' settings).
TRAIN_BATCH, TRAIN_LR, TRAIN_MOMENTUM = 32, 0.1, 0.9
GLOBAL_VERSION = 1  # the federated round's global model version (any; the client only checks it)

Observe = Callable[[str, int], tuple[Observation, Truth]]
_TRAINED: dict[str, dict[str, torch.Tensor]] = {}  # trained state dicts, so a process trains each model once


@dataclass(frozen=True)
class Scenario:
    """One setting: the model the attacks assume, how a spec's payloads are observed, and its facts."""

    name: str
    setting: Setting
    observe: Observe
    facts: dict[str, Any]


def scenarios(task: Task, base: Setting, config: AuditConfig) -> list[Scenario]:
    """The settings `config.settings` names, in that order."""
    out = []
    for name in config.settings:
        if name == "init":
            out.append(Scenario(name, base, _single(base, config.seed), {}))
        elif name == "trained":
            trained, facts = trained_setting(task, base, config)
            out.append(Scenario(name, trained, _single(trained, config.seed), facts))
        elif name == "federated":
            facts = {"local_epochs": config.local_epochs, "local_batch_size": config.local_batch_size}
            facts["local_lr"] = config.local_lr
            out.append(
                Scenario(name, base, lambda spec, batch: federated_observe(task, base, spec, batch, config), facts)
            )
        else:
            raise UserError(f"unknown audit setting {name!r}; known: {', '.join(SETTINGS)}")
    return out


def _single(setting: Setting, seed: int) -> Observe:
    return lambda spec, batch: observe(setting, spec, batch, seed)


def trained_setting(task: Task, base: Setting, config: AuditConfig) -> tuple[Setting, dict[str, Any]]:
    """`base` with its model trained `config.trained_epochs` epochs on the task's training set from
    its initialisation (batch order seeded by `config.seed`), and the trained model's test metrics."""
    key = json.dumps([config.task, config.task_args, config.seed, config.trained_epochs], sort_keys=True, default=str)
    model = task.make_model()
    if key not in _TRAINED:
        model.load_state_dict(base.model.state_dict())
        sgd = SGDConfig(config.trained_epochs, TRAIN_BATCH, TRAIN_LR, TRAIN_MOMENTUM)
        train_one(model, dataset_view(task.train_set), sgd, config.seed, task.objective)
        _TRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_TRAINED[key])
    model.eval()
    assert task.test_set is not None  # make_setting refused a task without one
    metrics = task.objective.evaluate(model, task.test_set)
    facts = {"trained_epochs": config.trained_epochs, **{f"test_{k}": round(v, 4) for k, v in metrics.items()}}
    return dataclasses.replace(base, model=model), facts


def federated_observe(
    task: Task, setting: Setting, spec: str, batch: int, config: AuditConfig
) -> tuple[Observation, Truth]:
    """Each group of `batch` victims is one client's shard for one round of the real client runtime;
    its compressed `local - global` is read back from the request as a pseudo-gradient."""
    ids = victim_groups(setting, batch)
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
    true, observed, mask = [], [], []
    wire_bytes = 0
    for g, group in enumerate(ids):
        client, data = f"victim-client-{g}", victims.subset(group)
        result = runtime.train(client, GLOBAL_VERSION, data)
        request, _, _ = runtime.build_update(client, GLOBAL_VERSION, GLOBAL_VERSION, result, ClientMemory(), data)
        wire_bytes = wire_bytes or request.ByteSize()
        scale = -1.0 / (config.local_lr * num_steps(data.num_examples, SGDConfig.of(local)))
        true.append(torch.cat([(result.params[k] - v).reshape(-1) for k, v in global_params.items()]) * scale)
        fields = update_fields(request)
        seen = [received(from_fields(fields[k])) for k in global_params]
        observed.append(torch.cat([values for values, _ in seen]) * scale)
        mask.append(torch.cat([sent for _, sent in seen]))
    labels = setting.test_y[ids]
    grads = GroupGradients(setting.model, global_params, labels, setting.objective)
    x = setting.test_x[ids]
    obs = Observation(grads, torch.stack(observed), torch.stack(mask), tuple(x.shape[2:]), setting.bounds)
    return obs, Truth(x, ids, torch.stack(true).detach(), wire_bytes)
