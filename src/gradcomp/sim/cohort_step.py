"""One SGD step of a whole cohort, as a function of stacked tensors, and its traced form.

`vmap(grad(functional_call(...)))` is exact but spends most of a small model's step in
Python (pytrees, the functorch transforms, swapping module parameters). The step is a fixed
sequence of aten operations for given tensor shapes, so `make_fx` records that sequence once
per shape; replaying the recorded graph runs the same operations without the transform
machinery. Each shape is recorded on first use; the cohort planner (sim/cohort.py) prefers
shapes it has recorded already, so a run records a handful.
"""

from __future__ import annotations

import warnings
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
    """The step's recorded replay per input shape, recorded on first use."""

    def __init__(self, step: StepFn):
        self.step = step
        self.replays: dict[tuple, Callable[..., tuple[torch.Tensor, ...]]] = {}

    def __call__(
        self, params: list[torch.Tensor], buffers: list[torch.Tensor], frozen: list[torch.Tensor], *data: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        flat = (*params, *buffers, *frozen, *data)
        key = (*((tuple(t.shape), t.dtype) for t in flat), (len(params), len(buffers)))
        replay = self.replays.get(key)
        if replay is None:
            replay = self.replays[key] = record(self.step, len(params), len(buffers), len(frozen), flat)
        out = replay(*flat)
        return list(out[: len(params)]), list(out[len(params) : -1]), out[-1]


def record(step: StepFn, n_params: int, n_buffers: int, n_frozen: int, example: tuple[torch.Tensor, ...]):
    """The step as a flat function of tensors: its aten graph (make_fx), replayed by TorchScript.

    TorchScript runs the graph's operations without a Python call per operation (about a
    third of the per-step overhead of replaying the FX graph in Python). `torch.jit` is
    deprecated in favour of torch.compile, whose compile time (tens of seconds on two cores)
    would exceed a whole small simulation; where `torch.jit.trace` is missing or fails, the
    FX graph itself is the replay.
    """
    a, b, c = n_params, n_params + n_buffers, n_params + n_buffers + n_frozen

    def flat_step(*t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new, buffers, loss = step(list(t[:a]), list(t[a:b]), list(t[b:c]), *t[c:])
        return (*new, *buffers, loss)

    with torch.enable_grad():
        gm = simplify(make_fx(flat_step, tracing_mode="fake")(*example))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.trace(gm, example, check_trace=False)
    except Exception:
        return gm
