"""The audit's setting: a model at its seeded initialisation, fixed victims from the test set,
and each victim batch's true gradient sent through a compression pipeline exactly as the wire
carries it (`Pipeline.compress`, `encode` to bytes, `decode`).

The attacker's view (`Observation`) is the model, the labels and the decoded payloads; the
ground truth (`Truth`) is kept apart and used only to score reconstructions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gradcomp.audit.gradients import GroupGradients
from gradcomp.compression import Payload, build, decode, encode
from gradcomp.errors import UserError
from gradcomp.tasks import Objective, Task, batch_of, dataset_len


def as_images(x: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor | None:
    """`x` (any leading dims, then `input_shape`) as [N, H, W]: the last two dims, or a flat square
    input as s x s (the digits MLP's 64 pixels are 8 x 8); None when the input is not an image."""
    if len(input_shape) >= 2:
        return x.reshape(-1, input_shape[-2], input_shape[-1])
    side = math.isqrt(input_shape[0])
    return x.reshape(-1, side, side) if side * side == input_shape[0] else None


@dataclass(frozen=True)
class Observation:
    """What the attacker has: the model, the labels, and what arrived on the wire."""

    grads: GroupGradients  # the model, its weights and the labels [G, B]
    observed: torch.Tensor  # [G, P] decoded payloads, zero off the transmitted coordinates
    mask: torch.Tensor  # [G, P] bool: the transmitted coordinates
    input_shape: tuple[int, ...]
    bounds: tuple[float, float]  # the data's value range (public knowledge of the domain)

    @property
    def groups(self) -> int:
        return int(self.grads.labels.shape[0])

    @property
    def batch(self) -> int:
        return int(self.grads.labels.shape[1])

    def random_inputs(self, seed: int) -> torch.Tensor:
        """Uniform inputs in the data range [G, B, *input_shape], the optimisation attacks' start."""
        lo, hi = self.bounds
        gen = torch.Generator().manual_seed(seed)
        x = lo + (hi - lo) * torch.rand(self.groups, self.batch, *self.input_shape, generator=gen)
        return x.requires_grad_()


@dataclass(frozen=True)
class Truth:
    """What the attacker must not see: the victims and their exact gradients."""

    victims: torch.Tensor  # [G, B, *input_shape]
    victim_ids: torch.Tensor  # [G, B] positions in the test set
    gradient: torch.Tensor  # [G, P]
    wire_bytes: int  # bytes of one encoded payload (the first group's)

    def cosine(self, observed: torch.Tensor) -> float:
        """Mean cosine between each group's observed payload and its true gradient."""
        return float(nn.functional.cosine_similarity(observed, self.gradient, dim=1).mean())


@dataclass(frozen=True)
class Setting:
    """The task-side facts every spec shares: model, data tensors, victims."""

    model: nn.Module
    test_x: torch.Tensor
    test_y: torch.Tensor
    victim_ids: torch.Tensor  # [victims]
    mean_image: torch.Tensor
    bounds: tuple[float, float]
    objective: Objective  # the task's loss: what the victims' gradients are gradients of


MEAN_EXAMPLES = 4096  # the data range and the mean image come from at most this many training examples


def make_setting(task: Task, victims: int, seed: int) -> Setting:
    """The model at seed `seed` (as `gradcomp train` would start it) and `victims` fixed test examples.

    Inputs keep their dtype when they are not floating point (token ids: the text attack's setting)."""
    if task.test_set is None:
        raise UserError("the audit needs the task's test set: its victims come from it")
    n_test, n_train = dataset_len(task.test_set), min(dataset_len(task.train_set), MEAN_EXAMPLES)
    test_x, test_y = batch_of(task.test_set, torch.arange(n_test))
    train_x = batch_of(task.train_set, torch.arange(n_train))[0]
    if not 1 <= victims <= n_test:
        raise UserError(f"--victims must be between 1 and the test set's {n_test} examples, got {victims}")
    if test_x.is_floating_point():
        test_x, train_x = test_x.float(), train_x.float()
    torch.manual_seed(seed)
    model = task.make_model().eval()
    order = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))
    bounds = (float(train_x.min()), float(train_x.max()))
    return Setting(model, test_x, test_y, order[:victims], train_x.float().mean(dim=0), bounds, task.objective)


def observe(setting: Setting, spec: str, batch: int, seed: int) -> tuple[Observation, Truth]:
    """Each group of `batch` victims computes its mean-loss gradient and sends it under `spec`.

    The whole gradient is one flat vector in parameter order, as a DDP bucket (and a whole
    client update) carries it; every group is a separate sender (its own pipeline key).
    """
    ids = victim_groups(setting, batch)
    groups = len(ids)
    x = setting.test_x[ids]
    labels = setting.test_y[ids]
    params = dict(setting.model.named_parameters())
    grads = GroupGradients(setting.model, params, labels, setting.objective)
    true = grads(x).detach()
    pipe = build(spec, seed=seed)
    observed = torch.zeros_like(true)
    mask = torch.zeros_like(true, dtype=torch.bool)
    wire_bytes = 0
    for g in range(groups):
        data = encode(pipe.compress(true[g], key=f"victim-batch-{g}"))
        wire_bytes = wire_bytes or len(data)
        observed[g], mask[g] = received(decode(data))
    obs = Observation(grads, observed, mask, tuple(x.shape[2:]), setting.bounds)
    return obs, Truth(x, ids, true, wire_bytes)


def victim_groups(setting: Setting, batch: int) -> torch.Tensor:
    """[G, batch] test-set positions: the victims cut into as many whole batches as they fill."""
    groups = len(setting.victim_ids) // batch
    if groups < 1:
        raise UserError(f"batch size {batch} needs at least {batch} victims, got {len(setting.victim_ids)}")
    return setting.victim_ids[: groups * batch].view(groups, batch)


def received(payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded payload as the attacker holds it: flat values (zero off the sent coordinates) and
    the bool mask of the sent coordinates."""
    dense = payload.to_dense().reshape(-1).float()
    positions = payload.positions
    if positions is None:
        return dense, torch.ones_like(dense, dtype=torch.bool)
    mask = torch.zeros_like(dense, dtype=torch.bool)
    mask[positions.long()] = True
    return dense, mask
