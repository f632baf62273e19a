"""One SGD step of a whole cohort, as a function of stacked tensors, and its traced form.

`vmap(grad(functional_call(...)))` is exact but spends most of a small model's step in
Python (pytrees, the functorch transforms, swapping module parameters). The step is a fixed
sequence of aten operations for given tensor shapes, so `make_fx` records that sequence once
per shape; replaying the recorded graph runs the same operations without the transform
machinery. Shapes that recur (a round's cohort of the same size) are traced on their second
use; a shape seen once runs eagerly, so odd shapes never pay for a trace.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.func import functional_call, grad, vmap
from torch.fx.experimental.proxy_tensor import make_fx

StepFn = Callable[..., tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]]

_aten = torch.ops.aten
_SAME_SHAPE_NOOPS = (_aten.expand.default, _aten.view.default, _aten._unsafe_view.default)


def sgd_step_fn(model: nn.Module, trainable: Sequence[str], fixed: Sequence[str], lr: float, momentum: float) -> StepFn:
    """step(params, buffers, fixed, x, y, w, active) -> (params, buffers, per-client loss).

    Row weights `w` make each client's loss the mean over its real rows; `active` (1 or 0
    per client) gates the update, so a padded step leaves parameters and momentum unchanged:
    buffer = buffer * (momentum if active else 1) + grad * active, as torch.optim.SGD does.
    """

    def loss(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], xb, yb, wb):
        out = functional_call(model, {**frozen, **params}, (xb,))
        total = (nn.functional.cross_entropy(out, yb, reduction="none") * wb).sum()
        return total, total.detach()

    per_client = vmap(grad(loss, has_aux=True), in_dims=(0, None, 0, 0, 0))

    def step(params, buffers, frozen, x, y, w, active):
        grads, value = per_client(
            dict(zip(trainable, params, strict=True)), dict(zip(fixed, frozen, strict=True)), x, y, w
        )
        g = [grads[k] for k in trainable]
        if momentum:
            keep = active * momentum + (1 - active)
            buffers = [b * _lead(keep, b) + gi * _lead(active, gi) for b, gi in zip(buffers, g, strict=True)]
            g = buffers
        new = [p - gi * _lead(active * lr, gi) for p, gi in zip(params, g, strict=True)]
        return new, buffers, value * active

    return step


def _lead(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-client vector shaped to broadcast over one stacked tensor."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def simplify(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the no-ops vmap leaves behind: views/expands to the same shape, x * 1."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            continue
        same = _shape(node) is not None and _shape(node) == _shape(src)
        if (node.target in _SAME_SHAPE_NOOPS and same) or (node.target == _aten.mul.Scalar and node.args[1] == 1):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class StepCache:
    """The eager step, and its traced graph for every shape that has come up twice."""

    def __init__(self, step: StepFn):
        self.step = step
        self.seen: Counter[tuple] = Counter()
        self.traced: dict[tuple, fx.GraphModule] = {}

    def __call__(self, *args: object) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        key = _key(args)
        gm = self.traced.get(key)
        if gm is None:
            self.seen[key] += 1
            if self.seen[key] < 2:
                return self.step(*args)
            with torch.enable_grad():
                gm = self.traced[key] = simplify(make_fx(self.step, tracing_mode="fake")(*args))
        return gm(*args)


def _key(args: Sequence[object]) -> tuple:
    out: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((tuple(a.shape), a.dtype))
        elif isinstance(a, list | tuple):
            out.append(_key(a))
    return tuple(out)
