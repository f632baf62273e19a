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

from gradcomp.fedclient.train import sgd_update
from gradcomp.tasks import Objective

StepFn = Callable[..., tuple[list[torch.Tensor], torch.Tensor]]
Penalty = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]

_aten = torch.ops.aten
_SAME_SHAPE_NOOPS = (_aten.expand.default, _aten.view.default, _aten._unsafe_view.default)


def grad_fn(
    model: nn.Module,
    trainable: Sequence[str],
    fixed: Sequence[str],
    objective: Objective,
    penalty: Penalty | None = None,
) -> StepFn:
    """grads(params, frozen, anchors, x, y, w) -> (per-client gradients, per-client task loss).

    Row weights `w` make each client's loss the mean over its real rows (0 for padding). The
    loss is the task's `objective.per_example`, which must be a pure tensor function (it runs
    under vmap and is recorded by make_fx); classification's is -log_softmax gathered at the
    label (`tasks.objective.token_nll`), 41 recorded operations per step where cross_entropy's
    ignore_index masking costs 54. `penalty(params, anchors)`, the strategy's client-half term
    (`strategies.client_half`), is added per client with that client's `anchors`.
    """

    def loss(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], anchors, xb, yb, wb):
        out = functional_call(model, {**frozen, **params}, (xb,))
        task = (objective.per_example(out, yb) * wb).sum()
        total = task if penalty is None else task + penalty(params, anchors)
        return total, task.detach()

    per_client = vmap(grad(loss, has_aux=True), in_dims=(0, None, 0, 0, 0, 0))

    def grads(params, frozen, anchors, x, y, w):
        named = dict(zip(trainable, params, strict=True))
        anchored = dict(zip(trainable, anchors, strict=True)) if anchors else {}
        g, value = per_client(named, dict(zip(fixed, frozen, strict=True)), anchored, x, y, w)
        return [g[k] for k in trainable], value

    return grads


def train_step(grads: StepFn, lr: float, momentum: float) -> Callable[..., torch.Tensor]:
    """step(params, buffers, frozen, anchors, x, y, w, active, loss_sum) -> loss_sum: one SGD step, in place.

    Gradients from `grads`, then the client step every path shares (`fedclient.train.sgd_update`),
    then loss_sum += loss * active (per client).
    """

    def step(params, buffers, frozen, anchors, x, y, w, active, loss_sum):
        g, loss = grads(params, frozen, anchors, x, y, w)
        with torch.no_grad():
            sgd_update(params, buffers, g, active, lr, momentum)
        return loss_sum.add_(loss * active)

    return step


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

    def replay(
        self,
        params: list[torch.Tensor],
        buffers: list[torch.Tensor],
        frozen: list[torch.Tensor],
        anchors: list[torch.Tensor],
        *data: torch.Tensor,
    ):
        """A function of (*params, *buffers, *frozen, *anchors, *data) running the step on tensors shaped like these."""
        flat = (*params, *buffers, *frozen, *anchors, *data)
        counts = (len(params), len(buffers), len(frozen), len(anchors))
        key = (*((tuple(t.shape), t.dtype) for t in flat), *counts)
        replay = self.replays.get(key)
        if replay is None:
            replay = self.replays[key] = record(self.fn, counts, flat)
        return replay


def record(fn: Callable[..., torch.Tensor], counts: tuple[int, int, int, int], example: tuple[torch.Tensor, ...]):
    """The step as a flat function of tensors: its aten graph (make_fx), replayed by TorchScript.

    `counts` are the numbers of parameter, buffer, frozen and anchor tensors at the front of `example`.
    TorchScript runs the graph's operations without a Python call per operation (about a
    third of the per-step overhead of replaying the FX graph in Python). `torch.jit` is
    deprecated in favour of torch.compile, whose compile time (tens of seconds on two cores)
    would exceed a whole small simulation; where `torch.jit.trace` is missing or fails, the
    FX graph itself is the replay. The recording runs on fake tensors, so `example` is untouched.
    """
    a = counts[0]
    b = a + counts[1]
    c = b + counts[2]
    d = c + counts[3]

    def flat_fn(*t: torch.Tensor) -> torch.Tensor:
        return fn(list(t[:a]), list(t[a:b]), list(t[b:c]), list(t[c:d]), *t[d:])

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
