"""Privacy accounting on top of Opacus' accountants.

One `PrivacyLedger` per run: record each mechanism application (noise multiplier,
sampling rate, steps), ask epsilon at the run's delta, ask before a step whether it
would exceed a budget, and checkpoint the ledger with the model. `ParticipationLedger`
keeps local client-level DP's per-client figures (q = 1, each client's own releases).

Every epsilon here is the ideal continuous mechanism's at delta less the residual the sampler's
finite reach still costs (`gaussian_residual_delta`); where that residual is not negligible (over
`NEGLIGIBLE_SHARE` of delta) no (epsilon, delta) guarantee is claimed: epsilon is infinite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from gradcomp.errors import GradcompError
from gradcomp.exact_noise import GAUSSIAN_REACH, LAPLACE_REACH

ACCOUNTANTS = ("rdp", "prv", "gdp")
NOISE_COORDINATES_BOUND = 2**40  # noised coordinates per release the residual is stated for (any model)
NEGLIGIBLE_SHARE = 0.01  # a residual above this share of delta voids the guarantee
_TINY = math.ulp(0.0)  # what an underflowed bound is reported as (still an upper bound)


def gaussian_residual_delta(
    noise_multiplier: float,
    releases: int = 1,
    *,
    coordinates: int = NOISE_COORDINATES_BOUND,
    reach: float = GAUSSIAN_REACH,
) -> float:
    """Delta added to the ideal Gaussian mechanism's by a sampler whose pair radius never exceeds `reach`.

    The sampler (Box-Muller on uniforms >= exp(-reach^2/2)) draws each pair of coordinates from the
    Gaussian conditioned on radius <= reach (B). For neighbours whose noised sums differ by a vector
    of norm <= 1/z in noise units (z = `noise_multiplier`), an output is impossible under one and
    possible under the other only if some pair's noise lands within 1/z of B's edge: per release at
    most pairs * exp(-(reach - 1/z)^2 / 2) under the Gaussian, doubled for the conditioning. Outside
    that event the privacy loss is the ideal one; the conditioning scales the ideal delta by at most
    1 + 2 * pairs * exp(-reach^2/2) per release. A union bound over releases (sampled or not, each
    counted) gives: releases * coordinates * 2 * (exp(-(reach - 1/z)^2/2) + exp(-reach^2/2)).
    Floating-point rounding inside B (Mironov 2012) is not covered; the discrete samplers avoid it.
    """
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0 or 1 / noise_multiplier >= reach:
        return 1.0
    gap = reach - 1 / noise_multiplier
    log_per_coordinate = math.log(2) + _logaddexp(-gap * gap / 2, -reach * reach / 2)
    return _bound(math.log(releases) + math.log(coordinates) + log_per_coordinate)


def laplace_residual_delta(
    epsilon: float, releases: int = 1, *, coordinates: int = NOISE_COORDINATES_BOUND, reach: float = LAPLACE_REACH
) -> float:
    """Delta that makes the Laplace mechanism's "pure" epsilon (per release) hold for a sampler with |z| <= `reach`.

    As for the Gaussian: an output impossible under the neighbour needs some coordinate within
    its shift of the edge; with L1 shifts summing to epsilon (noise units) that has probability at
    most exp(-reach) * (coordinates - 1 + e^epsilon); with the conditioning, per release at most
    2 exp(-reach) (2 coordinates + e^epsilon), composed over releases by a union bound.
    """
    if releases <= 0:
        return 0.0
    if not math.isfinite(epsilon) or epsilon >= reach:
        return 1.0
    log_per_release = math.log(2) + _logaddexp(math.log(2 * coordinates), epsilon) - reach
    return _bound(math.log(releases) + log_per_release)


def negligible_reach_problem(noise_multiplier: float, delta: float, releases: int = 1) -> str | None:
    """Why `noise_multiplier` at `delta` is refused (the sampler's residual delta is not negligible), or None."""
    if noise_multiplier == 0:
        return None  # no noise: epsilon is infinite anyway, and said so
    residual = gaussian_residual_delta(noise_multiplier, releases)
    if residual <= NEGLIGIBLE_SHARE * delta:
        return None
    return (
        f"noise multiplier {noise_multiplier} is too small for delta {delta:g}: the Gaussian sampler reaches "
        f"{GAUSSIAN_REACH:.2f} standard deviations, which leaves a residual delta of {residual:.3g} per "
        f"{releases} release(s) (more than {NEGLIGIBLE_SHARE:.0%} of delta); raise the noise multiplier"
    )


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _bound(log_value: float) -> float:
    return 1.0 if log_value >= 0 else max(math.exp(log_value), _TINY)


class BudgetExceeded(GradcompError, RuntimeError):
    """Taking another step would spend more epsilon than the configured budget."""


class PrivacyLedger:
    """Epsilon bookkeeping for the (sub)sampled Gaussian mechanism.

    `noise_multiplier` is sigma / sensitivity (the noise std divided by the clip norm);
    `sample_rate` is the probability that one example (or one client) takes part in a step.
    """

    def __init__(
        self, delta: float, accountant: str = "rdp", budget: float | None = None, *, reach: float = GAUSSIAN_REACH
    ):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if budget is not None and budget <= 0:
            raise ValueError(f"epsilon budget must be > 0, got {budget}")
        self.delta = delta
        self.kind = accountant
        self.budget = budget
        self.reach = reach  # of the sampler that draws this ledger's noise (KeyedStream.normal)
        self._acc = _create_accountant(accountant)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self._acc.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta (0 before any step)."""
        if not self._acc.history:
            return 0.0
        return self._epsilon(self._acc)

    def residual_delta(self, history: Iterable[tuple[float, float, int]] | None = None) -> float:
        """The sampler's residual delta over `history` (default: the recorded steps), a union bound."""
        steps = self._acc.history if history is None else history
        return min(1.0, sum(gaussian_residual_delta(z, int(n), reach=self.reach) for z, _, n in steps))

    def _epsilon(self, acc: Any) -> float:
        """Ideal epsilon at delta less the residual; infinite where the residual is not negligible."""
        residual = self.residual_delta(acc.history)
        if residual > NEGLIGIBLE_SHARE * self.delta:
            return math.inf
        return float(acc.get_epsilon(delta=self.delta - residual))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Epsilon if `steps` more steps were taken, without taking them."""
        _check(noise_multiplier, sample_rate)
        if noise_multiplier == 0:
            return math.inf
        probe = _create_accountant(self.kind)
        probe.history = [*list(self._acc.history), (noise_multiplier, sample_rate, steps)]
        return self._epsilon(probe)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        if self.budget is None:
            return False
        return self.epsilon_after(noise_multiplier, sample_rate, steps) > self.budget

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1, *, check_budget: bool = True) -> float:
        """Record `steps` applications; raises `BudgetExceeded` (recording nothing) past budget, unless
        `check_budget` is False (releases that already happened are recorded whatever the budget)."""
        _check(noise_multiplier, sample_rate)
        if check_budget and self.would_exceed(noise_multiplier, sample_rate, steps):
            raise BudgetExceeded(
                f"{steps} more step(s) at noise multiplier {noise_multiplier} and sampling rate "
                f"{sample_rate:g} would spend epsilon "
                f"{self.epsilon_after(noise_multiplier, sample_rate, steps):.3f} > budget "
                f"{self.budget} (delta={self.delta:g})"
            )
        hist = self._acc.history
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            hist[-1] = (noise_multiplier, sample_rate, hist[-1][2] + steps)
        else:
            hist.append((noise_multiplier, sample_rate, steps))
        return self.epsilon()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "delta": self.delta,
            "budget": self.budget,
            "history": [list(h) for h in self._acc.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"ledger was kept with {state['kind']!r}, not {self.kind!r}")
        self._acc.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def gaussian_epsilon(
    noise_multiplier: float, releases: int, delta: float, *, sample_rate: float = 1.0, accountant: str = "rdp"
) -> float:
    """Epsilon of `releases` applications of the (sub)sampled Gaussian mechanism, from Opacus' accountant.

    With `sample_rate` 1 this is an adversary who sees every release of a data holder who took
    part in all of them (no amplification): the local-DP and single-payload figures. Infinite
    without noise, 0 for no release.
    """
    if releases <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    ledger = PrivacyLedger(delta, accountant)
    return ledger.step(noise_multiplier, sample_rate, releases)


def _check(noise_multiplier: float, sample_rate: float) -> None:
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sample_rate}")


class ParticipationLedger:
    """Per-client epsilon for local client-level DP, against the coordinator itself.

    The coordinator chooses who takes part and sees each update in the clear (noised by the
    client), so sampling amplification does not apply: a client's guarantee is the Gaussian
    mechanism composed over its own participations, q = 1. One participation is one distinct
    (client, round) release; a round redone after a crash re-sends the same noise (seeded by
    client and round) and is not a new release.
    """

    def __init__(self, noise_multiplier: float, delta: float, accountant: str = "rdp", budget: float | None = None):
        _check(noise_multiplier, 1.0)
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.kind = accountant
        self.budget = budget
        self.participations: dict[str, int] = {}
        self._cache: dict[int, float] = {}

    def record(self, clients: Iterable[str]) -> None:
        """One more participation for each of `clients` (one round's released updates)."""
        for name in set(clients):
            self.participations[name] = self.participations.get(name, 0) + 1

    def epsilon_for(self, participations: int) -> float:
        """Epsilon of `participations` releases at q = 1 (Opacus' accountant, cached per count)."""
        if participations not in self._cache:
            self._cache[participations] = gaussian_epsilon(
                self.noise_multiplier, participations, self.delta, accountant=self.kind
            )
        return self._cache[participations]

    def epsilon(self, client: str) -> float:
        return self.epsilon_for(self.participations.get(client, 0))

    def worst(self) -> float:
        """The largest per-client epsilon so far (0 before any participation)."""
        return self.epsilon_for(max(self.participations.values(), default=0))

    def would_exceed(self) -> bool:
        """Whether one more participation of the most-used client would pass the budget."""
        if self.budget is None:
            return False
        return self.epsilon_for(max(self.participations.values(), default=0) + 1) > self.budget

    def distribution(self) -> dict[str, Any]:
        """Per-client epsilon over the clients that took part: worst, median, least, and how many."""
        counts = sorted(self.participations.values())
        if not counts:
            return {"clients": 0, "worst": 0.0, "median": 0.0, "least": 0.0}
        return {
            "clients": len(counts),
            "worst": self.epsilon_for(counts[-1]),
            "median": self.epsilon_for(counts[len(counts) // 2]),
            "least": self.epsilon_for(counts[0]),
            "most_participations": counts[-1],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "noise_multiplier": self.noise_multiplier,
            "participations": dict(self.participations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.participations = {str(k): int(v) for k, v in state["participations"].items()}


def _create_accountant(kind: str) -> Any:
    """Opacus accountant, imported on first use: a job without DP never loads Opacus (seconds, ~100 MB)."""
    from opacus.accountants import create_accountant

    return create_accountant(kind)
