"""The noise multiplier each federated privacy mode needs to reach a target epsilon after a job's rounds,
found by bisection on that mode's own accountant (the one its ledger charges with):

- central: `PrivacyLedger.epsilon_after` at q = clients per round / clients (Opacus RDP with sampling
  amplification; the adversary sees only the released models);
- distributed: `secagg.ddp.planned_epsilon` of the job's own secure-aggregation plan (KLS zCDP at
  `min_survivors`, q = 1; the adversary is the coordinator with fewer than t clients);
- local: `ParticipationLedger.epsilon_for` of the most-asked client (q = 1 per participation; the
  adversary is the coordinator). How often a client is asked follows from the coordinator's seeded
  sampler, so `participations` replays it (exact when no round is retried: no dropouts or stragglers).

Epsilon falls as the noise multiplier grows, so the bisection keeps the bracket's high end, whose
epsilon is at most the target: a calibrated job never reports more than it was asked for.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from gradcomp.privacy import ParticipationLedger, PrivacyLedger
from gradcomp.protocol.model import initial_params, model_spec
from gradcomp.secagg.ddp import planned_epsilon
from gradcomp.server.secure_round import plan_for
from gradcomp.sim.keys import coordinator_secret, simulation_secret
from gradcomp.sim.setup import fedsim_job
from gradcomp.sim.state import client_name
from gradcomp.strategies import strategy_for_job
from gradcomp.tasks import load_task

TOLERANCE = 1e-3  # relative: a calibrated epsilon lies in [target (1 - TOLERANCE), target]


def with_noise(data: dict[str, Any], z: float) -> dict[str, Any]:
    out = copy.deepcopy(data)
    out["privacy"]["noise_multiplier"] = z
    return out


def bisect_noise(epsilon: Callable[[float], float], target: float, lo: float = 0.3, hi: float = 100.0) -> float:
    """The smallest noise multiplier (to TOLERANCE in epsilon) whose epsilon is at most `target`.

    A bracketing search on log epsilon against log z (nearly linear: epsilon ~ 1/z), by regula falsi
    with the Illinois step, so it needs a handful of accountant calls rather than bisection's ~20; the
    bracket [lo, hi] always keeps epsilon(lo) > target >= epsilon(hi)."""
    epsilon_of = functools.cache(epsilon)  # Opacus' RDP accountant takes ~0.5 s a call

    def gap(x: float) -> float:
        return math.log(epsilon_of(math.exp(x))) - math.log(target)

    if epsilon_of(hi) > target:
        raise ValueError(f"even noise multiplier {hi} gives epsilon {epsilon_of(hi):.4g} > target {target}")
    while epsilon_of(lo) <= target:
        lo /= 2
    a, b = math.log(lo), math.log(hi)
    fa, fb, side = gap(a), gap(b), 0
    for _ in range(100):
        if gap(b) >= math.log1p(-TOLERANCE):
            return math.exp(b)
        x = b - fb * (b - a) / (fb - fa)
        fx = gap(x)
        if fx > 0:  # epsilon above the target: x is the new low end
            a, fa = x, fx
            fb = fb / 2 if side == 1 else fb  # the same end kept twice: halve its weight (Illinois)
            side = 1
        else:
            b, fb = x, fx
            fa = fa / 2 if side == -1 else fa
            side = -1
    raise RuntimeError(f"no noise multiplier within {TOLERANCE:.0e} of epsilon {target}")


def participations(data: dict[str, Any]) -> Counter[str]:
    """How often each client is asked over the job's rounds, replaying the coordinator's sampler
    (`Strategy.configure_round` draws from HMAC(coordinator secret, round, attempt); attempt 0 only)."""
    job = fedsim_job(data)
    strategy = strategy_for_job(job, coordinator_secret(simulation_secret(job)))
    names = [client_name(i) for i in range(job.clients.expected)]
    counts: Counter[str] = Counter()
    for number in range(1, job.rounds + 1):
        counts.update(strategy.configure_round(number, 0, names, job.clients_per_round))
    return counts


def epsilon_function(data: dict[str, Any]) -> Callable[[float], float]:
    """epsilon(z) of the job `data` (its privacy.mode) after all its rounds, as its ledger will report it."""
    job = fedsim_job(with_noise(data, 1.0))
    p, rounds = job.privacy, job.rounds
    if p.mode == "central":
        return lambda z: PrivacyLedger(p.delta, p.accountant).epsilon_after(z, job.sample_rate, rounds)
    if p.mode == "local":
        most = max(participations(data).values())
        return lambda z: ParticipationLedger(z, p.delta, p.accountant).epsilon_for(most)
    if p.mode == "distributed":
        model = model_spec(initial_params(load_task(job.task.name, **job.task.args), job.seed))

        def distributed(z: float) -> float:
            plan = plan_for(fedsim_job(with_noise(data, z)), model)
            assert plan is not None
            sigma_sq = float(plan.encoding.noise_sigma_sq())
            return planned_epsilon(rounds, plan.sensitivity, sigma_sq, plan.params.min_survivors, plan.dim, p.delta)

        return distributed
    raise ValueError(f"privacy.mode {p.mode!r} has no epsilon to calibrate")


def calibrate(data: dict[str, Any], target: float) -> tuple[float, float]:
    """(noise multiplier, its planned epsilon) for the job `data` to reach `target` after its rounds."""
    epsilon_of = epsilon_function(data)
    z = bisect_noise(epsilon_of, target)
    return z, epsilon_of(z)
