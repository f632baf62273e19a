"""Vectorised local training: a round's clients trained together with `torch.func`.

Every client of a cohort runs the same model on its own shard with its own SGD state, so
their local steps can run side by side: the clients' parameters are stacked along a new
leading dimension and one `vmap(grad(functional_call(...)))` computes every client's
gradient at once. Each client must take exactly the steps it would take alone:

- batch order: `client_batches` is the one shuffling rule, used by the sequential path too
  (one `torch.randperm` per epoch from a generator seeded with the client's seed);
- unequal shards: clients are padded to the cohort's step count and batch size; a padded
  row has loss weight 0 and a padded step has learning rate 0, so it changes nothing;
- the mean loss of a partial batch is a weighted sum with weight 1/len(batch) per real row.

The result equals the sequential path's within float rounding (tests/test_cohort.py).
Clients are grouped by shard size first (`plan_groups`), so one big client does not make a
hundred small ones run its step count.

Models whose training is not a pure function of (params, batch) cannot run this way:
batch-norm running statistics are updated in place, dropout draws from the global RNG in a
different order. `why_not_vectorizable` names the reason and the caller trains sequentially.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from gradcomp.fedclient.train import SGDConfig, epoch_orders, num_steps
from gradcomp.sim.cohort_step import StepCache, grad_fn, train_step
from gradcomp.sim.timing import NO_TIMINGS, Timings
from gradcomp.strategies import ClientHalf, Correction
from gradcomp.tasks import Objective, batch_of
from gradcomp.tasks.checks import vectorize_blocker

# Stacked parameters of one group stay under this many floats (x3 with gradients and momentum).
MAX_GROUP_FLOATS = 32 * 1024 * 1024
# What starting one more group costs, in steps of per-step overhead.
GROUP_COST_STEPS = 8
# A cohort whose full padded step is at most this many step overheads pads every group to its size.
PAD_OVERHEADS = 4


@dataclass
class CohortClient:
    """One client of a cohort: its shard (indices into the task's train set) and its seed."""

    indices: np.ndarray
    seed: int
    correction: Correction | None = None  # the strategy's term in this client's local loss


@dataclass
class TrainedClient:
    params: dict[str, torch.Tensor]  # the client's trainable parameters after local training
    train_loss: float  # mean of the batch losses, as the sequential path reports it
    steps: int


def why_not_vectorizable(model: nn.Module) -> str | None:
    """Why this model cannot be trained vectorised (None: it can); see `tasks.checks`."""
    return vectorize_blocker(model)


def overhead_rows(num_params: int) -> float:
    """A step's fixed cost (dispatch, Python) in rows of compute: about 5e5 / parameters."""
    return 5e5 / max(num_params, 1)


def record_rows(num_params: int) -> float:
    """Recording a new step shape (make_fx + TorchScript, ~0.15 s) in rows of compute, spread over
    the ~10 rounds a recorded shape is expected to serve (so a shape that saves work every round
    gets recorded, and a one-off does not)."""
    return 2.5e7 / max(num_params, 1)


def pad_rows(cohort: int, cfg: SGDConfig, num_params: int) -> int | None:
    """Rows every group of an overhead-bound cohort is padded to (None: each group to its bucket).

    When a whole cohort's step costs little more than a step's fixed overhead, padding rows
    are nearly free, and one shape per cohort size means one recording, not one per group.
    """
    full = bucket(cohort) * cfg.batch_size
    return bucket(cohort) if full <= PAD_OVERHEADS * overhead_rows(num_params) else None


@dataclass(frozen=True)
class GroupCost:
    """The cost model of `plan_groups`, in rows of compute (see there)."""

    cfg: SGDConfig
    num_params: int
    padded: int | None
    known: Callable[[int, int], bool]

    def __call__(self, clients: int, largest: int) -> float:
        width = bucket(largest, self.cfg.batch_size)
        rows = self.padded or bucket(clients)
        overhead = overhead_rows(self.num_params)
        cost = num_steps(largest, self.cfg) * (overhead + rows * width) + GROUP_COST_STEPS * overhead
        return cost if self.known(rows, width) else cost + record_rows(self.num_params)


def plan_groups(
    sizes: Sequence[int], cfg: SGDConfig, num_params: int, known: Callable[[int, int], bool] = lambda r, w: True
) -> list[list[int]]:
    """Split a cohort into groups of similar shard size (positions into `sizes`).

    Cost model of a group: steps x (fixed per-step overhead + rows computed), rows being the
    padded clients x padded batch, plus a fixed cost per group (more steps) and the cost of
    recording its shape if `known(rows, width)` says it has not been recorded yet. Costs are
    counted in rows: large models are compute-bound, small ones overhead-bound. Solved exactly
    by dynamic programming over the clients sorted by size, with groups capped at MAX_GROUP_FLOATS.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    n = len(order)
    cap = max(1, MAX_GROUP_FLOATS // max(num_params, 1))
    cost = GroupCost(cfg, num_params, pad_rows(n, cfg, num_params), known)
    # Clients with the same steps and padded batch are interchangeable, so groups only need to
    # start or end where that class changes (or where a group reaches the cap).
    shape = [(num_steps(int(sizes[i]), cfg), bucket(int(sizes[i]), cfg.batch_size)) for i in order]
    cuts = sorted({0, n} | {i for i in range(1, n) if shape[i] != shape[i - 1]} | set(range(cap, n, cap)))
    best = {0: 0.0}
    back: dict[int, int] = {}
    for j, end in enumerate(cuts[1:], start=1):
        for start in cuts[:j]:
            if end - start > cap:
                continue
            # the largest shard of the group sets its steps and batch
            total = best[start] + cost(end - start, int(sizes[order[start]]))
            if total < best.get(end, math.inf):
                best[end], back[end] = total, start
    groups, end = [], n
    while end > 0:
        groups.append(order[back[end] : end])
        end = back[end]
    return groups[::-1]


# Padded group sizes: a group of n clients runs as the next of these, so few shapes recur.
SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@lru_cache(maxsize=4096)
def bucket(n: int, limit: int | None = None) -> int:
    """The padded size for n: the next bucket (or power of two above the table), at most `limit`."""
    n = int(n) if limit is None else min(int(n), limit)
    b = next((s for s in SIZE_BUCKETS if s >= n), 1 << (n - 1).bit_length())
    return b if limit is None else min(b, limit)


@dataclass
class _Schedule:
    """A group's padded batches: example index, loss weight per row; learning-rate mask per step.

    Groups are padded to `bucket` sizes (dummy clients have weight 0 and never step), so the
    step's shapes repeat from round to round and its traced graph is reused.
    """

    index: torch.Tensor  # [steps, clients, batch] int64 positions in the train set
    weight: torch.Tensor  # [steps, clients, batch] 1/len(batch) for real rows, 0 for padding
    active: torch.Tensor  # [steps, clients] 1.0 where the client takes this step
    steps: list[int]


def _schedule(clients: Sequence[CohortClient], cfg: SGDConfig, rows: int | None) -> _Schedule:
    sizes = [c.indices.size for c in clients]
    steps = [num_steps(n, cfg) for n in sizes]
    width, rows = bucket(max(sizes), cfg.batch_size), max(rows or 0, bucket(len(clients)))
    # Built in numpy: per client these are a dozen operations on a few dozen numbers, where
    # torch's per-call cost would dominate (a 100-client cohort is built in ~1 ms, not ~8).
    index = np.zeros((max(steps), rows, width), dtype=np.int64)
    weight = np.zeros((max(steps), rows, width), dtype=np.float32)
    active = np.zeros((max(steps), rows), dtype=np.float32)
    for c, client in enumerate(clients):
        _client_rows(client, cfg, index[: steps[c], c], weight[: steps[c], c])
        active[: steps[c], c] = 1.0
    return _Schedule(torch.from_numpy(index), torch.from_numpy(weight), torch.from_numpy(active), steps)


def _client_rows(client: CohortClient, cfg: SGDConfig, index: np.ndarray, weight: np.ndarray) -> None:
    """Fill one client's [steps, width] train-set positions and row weights (1/len(batch), 0 = pad).

    The same batches as `client_batches`, built from the same `epoch_orders`.
    """
    n, b = int(client.indices.size), cfg.batch_size
    per_epoch = math.ceil(n / b)
    padded = np.full((cfg.epochs, per_epoch * b), -1, dtype=np.int64)
    padded[:, :n] = epoch_orders(n, cfg, client.seed).numpy()
    padded = padded.reshape(cfg.epochs * per_epoch, b)[:, : index.shape[1]]
    real = (padded >= 0).astype(np.float32)
    index[:] = client.indices[np.maximum(padded, 0)]
    weight[:] = real / real.sum(axis=1, keepdims=True)


class CohortTrainer:
    """Trains cohorts of clients of one model on one train set (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        cfg: SGDConfig,
        objective: Objective,
        half: ClientHalf | None = None,
        timings: Timings = NO_TIMINGS,
    ):
        reason = why_not_vectorizable(model)
        if reason is not None:
            raise ValueError(f"cannot train this model vectorised: {reason}")
        self.dataset, self.cfg, self.timings = dataset, cfg, timings
        self.trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        self.fixed = [k for k in model.state_dict() if k not in self.trainable]
        self.num_params = sum(p.numel() for _, p in model.named_parameters() if p.requires_grad)
        self.shapes: set[tuple[int, int]] = set()  # (rows, width) of the groups run so far
        # The strategy's client half adds its penalty to every client's loss, with the client's own anchors.
        penalty = half.penalty if half is not None and type(half).anchors is not ClientHalf.anchors else None
        grads = grad_fn(model, self.trainable, self.fixed, objective, penalty)
        self.step = StepCache(train_step(grads, cfg.lr, cfg.momentum))

    def _anchors(self, clients: Sequence[CohortClient], rows: int) -> list[torch.Tensor]:
        """Each trainable tensor's anchors stacked over the group's rows (padding rows repeat the last
        client's); none when the strategy adds no term."""
        if clients[0].correction is None:
            return []
        corrections = [c.correction for c in clients if c.correction is not None]
        if len(corrections) != len(clients):
            raise ValueError("a cohort's clients either all carry a strategy correction or none does")
        padded = corrections + [corrections[-1]] * (rows - len(corrections))
        return [torch.stack([c.anchors[k] for c in padded]) for k in self.trainable]

    def train(self, start: dict[str, torch.Tensor], clients: Sequence[CohortClient]) -> list[TrainedClient]:
        """Train every client from the parameters `start`; results in the order of `clients`."""
        out: list[TrainedClient | None] = [None] * len(clients)
        sizes = [c.indices.size for c in clients]
        rows = pad_rows(len(clients), self.cfg, self.num_params)
        for group in plan_groups(sizes, self.cfg, self.num_params, lambda r, w: (r, w) in self.shapes):
            for pos, trained in zip(group, self._train_group(start, [clients[i] for i in group], rows), strict=True):
                out[pos] = trained
        return [t for t in out if t is not None]

    @torch.no_grad()
    def _train_group(
        self, start: dict[str, torch.Tensor], clients: Sequence[CohortClient], rows: int | None
    ) -> list[TrainedClient]:
        with self.timings.part("schedules"):
            sched = _schedule(clients, self.cfg, rows)
        self.shapes.add((sched.index.shape[1], sched.index.shape[2]))
        rows = sched.active.shape[1]
        frozen = [start[k] for k in self.fixed]
        params = [start[k].detach().unsqueeze(0).repeat(rows, *([1] * start[k].dim())) for k in self.trainable]
        buffers = [torch.zeros_like(p) for p in params] if self.cfg.momentum else []
        xs, ys = batch_of(self.dataset, sched.index.reshape(-1))
        xs, ys = xs.view(*sched.index.shape, *xs.shape[1:]), ys.view(*sched.index.shape, *ys.shape[1:])
        loss_sum = torch.zeros(rows)
        anchors = self._anchors(clients, rows)
        state = (*params, *buffers, *frozen, *anchors)
        first = (xs[0], ys[0], sched.weight[0], sched.active[0], loss_sum)
        replay = self.timings.wrap("steps", self.step.replay(params, buffers, frozen, anchors, *first))
        for batch in zip(xs.unbind(0), ys.unbind(0), sched.weight.unbind(0), sched.active.unbind(0), strict=True):
            replay(*state, *batch, loss_sum)
        return [
            TrainedClient(
                {k: p[c] for k, p in zip(self.trainable, params, strict=True)},
                float(loss_sum[c]) / sched.steps[c],
                sched.steps[c],
            )
            for c in range(len(clients))
        ]
