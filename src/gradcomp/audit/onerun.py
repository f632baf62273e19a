"""One-run privacy audit of the DP-SGD path (Steinke, Nasr and Jagielski 2023, white box).

m gradient canaries are each put in the training set independently with probability 1/2. A
canary is a Dirac gradient: clip x a unit vector on a coordinate of its own (a parameter block
the model's forward never reads, so real examples never touch it). Training runs on the real
DP-SGD parts: `PoissonPlan` batches over examples + included canaries, `ExampleDP` clipping and
noise, and the epsilon its own ledger reports (charged by `ExampleDP.account`, as the training
loop charges it), not a recomputation. The auditor sees every step's released noisy gradient (white box),
scores each canary by the sum of its coordinate over the steps, guesses "in" for the k highest
scores and "out" for the k lowest, and counts the correct guesses. If the run were
(epsilon, delta)-DP, that count could exceed a Binomial(2k, e^eps / (1 + e^eps)) tail only
with small probability (their Theorem 3.1, with its delta term); the largest epsilon rejected
at the chosen confidence is an empirical lower bound, which must stay at or below the
accountant's epsilon. A lower bound above it means the implementation or its accounting is wrong.

How sharp it is: with 100 guesses the bound cannot pass ~3.47 (every guess right), and even a
perfect white-box adversary gets a bound near half the true epsilon from one run. So it can only
catch gross errors: at noise multiplier 2 (epsilon 1.93) a mechanism adding no noise is caught
(`noise_scale=0`), one adding half the noise is not. The noise scale itself is pinned by direct
measurement in tests/test_train_dp.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from scipy.stats import binom
from torch import nn
from torch.utils.data import TensorDataset

from gradcomp.config.train import DPConfig
from gradcomp.errors import UserError
from gradcomp.tasks import load_task
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.sampling import PoissonPlan


@dataclass(frozen=True)
class OneRunConfig:
    """The audited DP-SGD run and the audit's own choices (fixed before the run, as the bound requires)."""

    task: str = "digits-mlp"
    canaries: int = 1000
    guesses: int = 100  # k = guesses / 2 "in" and k "out"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.5
    clip: float = 1.0
    noise_multiplier: float = 1.0  # the DP configuration: what the ledger is charged
    noise_scale: float = 1.0  # fault injection: the mechanism adds noise_scale x the configured noise
    delta: float = 1e-5
    confidence: float = 0.95
    seed: int = 0


class _MisnoisedDP(ExampleDP):
    """An `ExampleDP` whose mechanism adds `scale` times the noise its ledger is charged for: the
    broken implementation the audit must be able to catch."""

    scale: float = 1.0

    @property
    def noise_std(self) -> float:
        return super().noise_std * self.scale


class _WithCanarySlots(nn.Module):
    """The task's model plus one parameter per canary that the forward pass never reads."""

    def __init__(self, inner: nn.Module, canaries: int):
        super().__init__()
        self.inner = inner
        self.canary_slots = nn.Parameter(torch.zeros(canaries))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def one_run_audit(cfg: OneRunConfig) -> dict[str, Any]:
    """Train once with canaries; the empirical epsilon lower bound next to the accountant's epsilon."""
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    if not isinstance(task.train_set, TensorDataset):
        raise UserError(f"the one-run audit needs a task whose train set is in memory, not {cfg.task!r}")
    x_all, y_all = task.train_set.tensors
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    included = torch.rand(cfg.canaries, generator=gen) < 0.5
    members = included.nonzero().flatten()  # canary i joins as example n + rank among the included
    model = _WithCanarySlots(task.make_model(), cfg.canaries)
    plan = PoissonPlan.for_job(len(x_all) + len(members), cfg.batch_size, 1)
    dp = _MisnoisedDP(
        model,
        DPConfig(clip=cfg.clip, noise_multiplier=cfg.noise_multiplier, delta=cfg.delta),
        world=1,
        split_noise=True,
        sample_rate=plan.sample_rate,
        expected_batch=plan.expected_local_batch,
        noise_seed=cfg.seed,  # an audit is reproducible; training draws secret noise
        objective=task.objective,
    )
    dp.scale = cfg.noise_scale
    scores = _train_and_score(cfg, model, dp, plan, x_all, y_all, members)
    return _judge(cfg, scores, included, dp, plan)


def _train_and_score(
    cfg: OneRunConfig,
    model: nn.Module,
    dp: ExampleDP,
    plan: PoissonPlan,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    members: torch.Tensor,
) -> torch.Tensor:
    """Run DP-SGD; each canary's score is the sum over steps of its coordinate in the released gradient."""
    n, size = len(x_all), sum(p.numel() for p in model.parameters())
    # where the canary block sits in the flat gradient (a module's own parameters come before its children's)
    slots = _offset(model, dp, "canary_slots")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    scores = torch.zeros(cfg.canaries, dtype=torch.float64)
    inclusions = torch.Generator().manual_seed(cfg.seed + 2)
    for epoch in range(cfg.epochs):
        for batch in plan.batches(0, cfg.seed, epoch, inclusions):
            real, canary = batch[batch < n], members[batch[batch >= n] - n]
            rows = torch.zeros(len(canary), size)
            rows[torch.arange(len(canary)), slots + canary] = cfg.clip
            flat, _ = dp.gradient(x_all[real], y_all[real], canaries=rows)
            scores += flat[slots : slots + cfg.canaries].double()
            optimizer.zero_grad(set_to_none=True)
            dp.write_grads(flat)
            dp.account()  # the step is released: charged exactly as the training loop charges it
            optimizer.step()
    return scores


def _offset(model: nn.Module, dp: ExampleDP, name: str) -> int:
    """Where parameter `name` starts in `dp`'s flat gradients (they follow `dp.names`)."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in dp.names[: dp.names.index(name)])


def _judge(
    cfg: OneRunConfig, scores: torch.Tensor, included: torch.Tensor, dp: ExampleDP, plan: PoissonPlan
) -> dict[str, Any]:
    k = cfg.guesses // 2
    order = torch.argsort(scores, descending=True)
    correct = int(included[order[:k]].sum()) + int((~included[order[-k:]]).sum())
    upper, steps = dp.epsilon(), dp.ledger.steps  # what the run's own ledger reports
    lower = epsilon_lower_bound(cfg.canaries, 2 * k, correct, cfg.delta, 1 - cfg.confidence)
    return {
        "epsilon_lower_bound": lower,
        "epsilon_accountant": upper,
        "consistent": lower <= upper,
        "correct_guesses": correct,
        "guesses": 2 * k,
        "steps": steps,
        "sample_rate": plan.sample_rate,
        "config": asdict(cfg),
    }


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the run were (epsilon, delta)-DP (Steinke et al., Thm 3.1).

    A Binomial(r, e^eps / (1 + e^eps)) tail, plus the delta term 2 m delta max_i P[v-i <= B < v] / i.
    """
    q = 1 / (1 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    below = binom.pmf(torch.arange(v - 1, -1, -1).numpy(), r, q).cumsum()  # P[v-i <= B < v], i = 1..v
    alpha = float((below / torch.arange(1, v + 1).numpy()).max()) if v > 0 else 0.0
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """The largest epsilon whose p-value is below `alpha` (bisection); 0 when none is rejected."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo
