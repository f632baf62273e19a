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
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gradcomp.audit.config import AuditConfig
from gradcomp.audit.federated import federated_observe
from gradcomp.audit.observe import Observation, Setting, Truth, observe
from gradcomp.audit.secure_view import secagg_observe
from gradcomp.errors import UserError
from gradcomp.fedclient.data import dataset_view
from gradcomp.fedclient.train import SGDConfig, train_one
from gradcomp.tasks import Task

SETTINGS = ("init", "trained", "federated", "secagg")  # the default: all but secagg
# How the `trained` model is trained (centralised SGD, the digits examples' settings).
TRAIN_BATCH, TRAIN_LR, TRAIN_MOMENTUM = 32, 0.1, 0.9

Observe = Callable[[str, int], tuple[Observation, Truth]]
_TRAINED: dict[str, dict[str, torch.Tensor]] = {}  # trained state dicts, so a process trains each model once


@dataclass(frozen=True)
class Scenario:
    """One setting: the model the attacks assume, how a spec's payloads are observed, and its facts."""

    name: str
    setting: Setting
    observe: Observe
    facts: dict[str, Any]
    # Also attack a payload of pure noise in the observation's place: the attacks' chance level on these
    # victims (what they "re-identify" from no information), for a setting whose claim is chance.
    chance_control: bool = False


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
        elif name == "secagg":
            masked = lambda spec, batch: secagg_observe(task, base, spec, batch, config)  # noqa: E731
            out.append(Scenario(name, base, masked, {}, chance_control=True))
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
