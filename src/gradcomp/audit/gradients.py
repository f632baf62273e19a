"""Per-group parameter gradients of one model, every group in one autograd graph.

A gradient-inversion attack on G victim batches is G independent problems; computing them as
one batched problem (a copy of the parameters per group, `vmap` over the forward) costs about
one small problem's time instead of G of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, vmap

from gradcomp.tasks import Classification, Objective


class GroupGradients:
    """`grads(x)` -> [G, P]: the flat mean-loss gradient of each group of inputs `x` [G, B, ...].

    The loss is the task's objective (default: classification), with the targets the attacker is
    assumed to know (`labels` [G, B, ...]: class labels, regression targets, next tokens). The flat
    order is `model.named_parameters()` order, the order the wire carries.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        objective: Objective | None = None,
    ):
        self.model = model
        self.params = {n: p.detach() for n, p in params.items()}
        self.labels = labels  # [G, B, ...]
        self.objective = objective if objective is not None else Classification()

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def offsets(self) -> dict[str, tuple[int, int]]:
        """(start, end) of each named parameter in the flat vector."""
        out, at = {}, 0
        for name, p in self.params.items():
            out[name] = (at, at + p.numel())
            at += p.numel()
        return out

    def __call__(self, x: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """Flat gradients [G, P]; with `create_graph` they stay differentiable in `x` (for attacks)."""
        groups, batch = self.labels.shape[:2]
        copies = {n: p.expand(groups, *p.shape).clone().requires_grad_() for n, p in self.params.items()}

        def forward(p: dict[str, torch.Tensor], xg: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, p, (xg,))

        out = vmap(forward)(copies, x)  # [G, B, ...]
        flat_out = out.reshape(groups * batch, *out.shape[2:])
        losses = self.objective.per_example(flat_out, self.labels.reshape(groups * batch, *self.labels.shape[2:]))
        total = losses.view(groups, batch).mean(dim=1).sum()  # each group's own mean loss
        grads = torch.autograd.grad(total, list(copies.values()), create_graph=create_graph)
        return torch.cat([g.reshape(groups, -1) for g in grads], dim=1)
