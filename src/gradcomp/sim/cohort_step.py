"""One SGD step of a whole cohort, recorded: the gradients, the in-place update and the loss sum.

`vmap(grad(functional_call(...)))` is exact but spends most of a small model's step in
Python (pytrees, the functorch transforms, swapping module parameters). The step is a fixed
sequence of aten operations for given tensor shapes, so `make_fx` records that sequence once
per shape, SGD update included (`train_step`); replaying the recorded graph runs the same
operations without the transform machinery or a Python call per parameter tensor. Each shape
is recorded on first use; the cohort planner (sim/cohort.py) prefers shapes it has recorded
already, so a run records a handful.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.func import functional_call, grad, vmap
from torch.fx.experimental.proxy_tensor import make_fx

from gradcomp.tasks import Objective

StepFn = Callable[..., tuple[list[torch.Tensor], torch.Tensor]]

_aten = torch.ops.aten
_SAME_SHAPE_NOOPS = (_aten.expand.default, _aten.view.default, _aten._unsafe_view.default)


def grad_fn(model: nn.Module, trainable: Sequence[str], fixed: Sequence[str], objective: Objective) -> StepFn:
    """grads(params, frozen, x, y, w) -> (per-client gradients, per-client loss).

    Row weights `w` make each client's loss the mean over its real rows (0 for padding). The
    loss is the task's `objective.per_example`, which must be a pure tensor function (it runs
    under vmap and is recorded by make_fx); classification's is -log_softmax gathered at the
    label (`tasks.objective.token_nll`), 41 recorded operations per step where cross_entropy's
    ignore_index masking costs 54.
    """

    def loss(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], xb, yb, wb):
        out = functional_call(model, {**frozen, **params}, (xb,))
        total = (objective.per_example(out, yb) * wb).sum()
        return total, total.detach()

    per_client = vmap(grad(loss, has_aux=True), in_dims=(0, None, 0, 0, 0))

    def grads(params, frozen, x, y, w):
        g, value = per_client(dict(zip(trainable, params, strict=True)), dict(zip(fixed, frozen, strict=True)), x, y, w)
        return [g[k] for k in trainable], value

    return grads


@torch.no_grad()
def sgd_update(
    params: list[torch.Tensor],
    buffers: list[torch.Tensor],
    grads: list[torch.Tensor],
    active: torch.Tensor,
    lr: float,
    momentum: float,
) -> None:
    """torch.optim.SGD's step for every client at once, in place; `active` (1 or 0 per client) gates it.

    p += -lr * g * active, and with momentum buf = buf * (momentum if active else 1) + g * active
    first: a client that sits a padded step out keeps its parameters and momentum exactly.
    In place, because a cohort's parameters are many megabytes and fresh tensors per step
    cost more than the arithmetic.
    """
    if momentum:
        keep = active * momentum + (1 - active)
        for b, g in zip(buffers, grads, strict=True):
            b.mul_(_lead(keep, b)).addcmul_(g, _lead(active, g))
        grads = buffers
    for p, g in zip(params, grads, strict=True):
        p.addcmul_(g, _lead(active, g), value=-lr)


def train_step(grads: StepFn, lr: float, momentum: float) -> Callable[..., torch.Tensor]:
    """step(params, buffers, frozen, x, y, w, active, loss_sum) -> loss_sum: one SGD step, in place.

    Gradients from `grads`, then `sgd_update`, then loss_sum += loss * active (per client).
    """

    def step(params, buffers, frozen, x, y, w, active, loss_sum):
        g, loss = grads(params, frozen, x, y, w)
        sgd_update(params, buffers, g, active, lr, momentum)
        return loss_sum.add_(loss * active)

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
    """The train step's recorded replay per input shape, recorded on first use."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.replays: dict[tuple, Callable[..., torch.Tensor]] = {}

    def replay(self, params: list[torch.Tensor], buffers: list[torch.Tensor], frozen: list[torch.Tensor], *data):
        """A function of (*params, *buffers, *frozen, *data) that runs the step on tensors shaped like these."""
        flat = (*params, *buffers, *frozen, *data)
        key = (*((tuple(t.shape), t.dtype) for t in flat), len(params), len(buffers))
        replay = self.replays.get(key)
        if replay is None:
            replay = self.replays[key] = record(self.fn, (len(params), len(buffers), len(frozen)), flat)
        return replay


def record(fn: Callable[..., torch.Tensor], counts: tuple[int, int, int], example: tuple[torch.Tensor, ...]):
    """The step as a flat function of tensors: its aten graph (make_fx), replayed by TorchScript.

    `counts` are the numbers of parameter, buffer and frozen tensors at the front of `example`.
    TorchScript runs the graph's operations without a Python call per operation (about a
    third of the per-step overhead of replaying the FX graph in Python). `torch.jit` is
    deprecated in favour of torch.compile, whose compile time (tens of seconds on two cores)
    would exceed a whole small simulation; where `torch.jit.trace` is missing or fails, the
    FX graph itself is the replay. The recording runs on fake tensors, so `example` is untouched.
    """
    a = counts[0]
    b = a + counts[1]
    c = b + counts[2]

    def flat_fn(*t: torch.Tensor) -> torch.Tensor:
        return fn(list(t[:a]), list(t[a:b]), list(t[b:c]), *t[c:])

    with torch.enable_grad():
        gm = simplify(make_fx(flat_fn, tracing_mode="fake")(*example))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.trace(gm, _copies(example), check_trace=False)
    except Exception:
        return gm


def _copies(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Tracing runs the graph once, and the step updates its inputs in place: trace on copies."""
    return tuple(t.clone() for t in example)
