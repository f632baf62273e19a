"""Client-level privacy accounting of one federated job: the sampling rate each round is charged
at, who is charged, and the budget checks, over `privacy.PrivacyLedger` / `ParticipationLedger`.

Released rounds (central DP; local DP's `epsilon_released_model`): one subsampled-Gaussian step per
aggregated round at the rate that round really used (`round_sample_rate`), not the configured
m / N. The Opacus accountant keeps the history of (noise multiplier, q, steps), so rounds at
different rates compose and a checkpoint restores the same epsilon.

Local DP (the coordinator is the adversary): a client is charged one participation for a round
when it is asked to train (the round's opening or a retry), before it can send anything, so a
client that misses the deadline, whose late update is read and refused, or whose round fails or
is interrupted by a crash is charged all the same. An update from a client never asked for the
round is refused before decoding and not charged (a client following the protocol sends only when
asked). The charge is persisted with the clients charged for the open round (`charged_round`), so a
round redone after `--resume` does not charge a client twice for one round number: a client
re-sends the same noisy update for a round it already built (one release), and a client asked only
after the restart is charged then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from gradcomp.config.fed import FedJob
from gradcomp.privacy import ParticipationLedger, PrivacyLedger
from gradcomp.secagg.ddp import DistributedLedger, epsilon_from_zcdp, sum_zcdp
from gradcomp.secagg.plan import SecurePlan


def round_sample_rate(attempts: Sequence[tuple[int, int]]) -> float:
    """q of one round from its attempts, each (clients asked, size of the pool they were drawn from).

    An attempt draws its clients uniformly without replacement, so whatever happened before, a
    client is asked in attempt k with probability at most asked_k / pool_k; 1 - prod_k (1 - asked_k /
    pool_k) bounds the chance it is asked at all. When each retry draws from the first pool's clients
    not yet asked this is exactly (distinct clients asked) / (first pool); a retry drawn from a pool
    that shrank (clients left) or that had to take back clients already asked gets the larger figure.
    It is 1 when a pool is not larger than the clients asked from it.
    """
    none_asked = Fraction(1)
    for asked, pool in attempts:
        if asked > 0:  # an empty pool cannot have been drawn from: count it as everyone asked
            none_asked *= max(Fraction(0), 1 - Fraction(asked, pool)) if pool > 0 else Fraction(0)
    return float(1 - none_asked)


class FedAccounting:
    """The job's ledgers: `ledger` charges released rounds at their real q (its budget binds in central
    DP); `clients` (local DP only) charges each asked client at q = 1 (its worst client binds)."""

    def __init__(self, job: FedJob):
        dp = job.dp_params()
        self.noise_multiplier = dp[1] if dp is not None else None
        self.planned_rate = job.sample_rate
        self.ledger: PrivacyLedger | None = None
        self.clients: ParticipationLedger | None = None
        self.charged_round = 0  # the round number `charged` belongs to
        self.charged: set[str] = set()  # clients already charged for that round
        self.distributed: DistributedLedger | None = None  # distributed DP: each round's sum at its survivors
        self.plan: SecurePlan | None = None  # set by the coordinator once it knows the model's size
        self.budget = job.privacy.epsilon_budget
        p = job.privacy
        if dp is not None and p.mode == "distributed":
            self.distributed = DistributedLedger(p.delta)
        elif dp is not None and p.mode == "local":
            self.ledger = PrivacyLedger(p.delta, p.accountant)
            self.clients = ParticipationLedger(dp[1], p.delta, p.accountant, p.epsilon_budget)
        elif dp is not None:
            self.ledger = PrivacyLedger(p.delta, p.accountant, p.epsilon_budget)

    @property
    def epsilon(self) -> float | None:
        """The job's epsilon: the worst client's in local DP, the released rounds' otherwise."""
        if self.clients is not None:
            return self.clients.worst()
        if self.distributed is not None:
            return self.distributed.epsilon
        return self.ledger.epsilon() if self.ledger else None

    def charge_sum(self, survivors: int) -> dict[str, Any]:
        """Distributed DP: charge one released sum of `survivors` clients' noise; the round-log fields."""
        if self.distributed is None:
            return {}
        assert self.plan is not None
        e = self.plan.encoding
        self.distributed.charge(e.norm_bound, float(e.noise_sigma_sq()), survivors, self.plan.dim)
        return {"epsilon": self.distributed.epsilon, "survivors": survivors}

    def _distributed_problem(self) -> str | None:
        """Why one more round at the fewest survivors a round may have would pass the budget."""
        ddp, plan = self.distributed, self.plan
        if ddp is None or plan is None or self.budget is None:
            return None
        e = plan.encoding
        rho = sum_zcdp(e.norm_bound, float(e.noise_sigma_sq()), plan.params.min_survivors, plan.dim)
        after = epsilon_from_zcdp(sum(ddp.rhos) + rho, ddp.delta)
        if after <= self.budget:
            return None
        return (
            f"privacy budget: one more round at {plan.params.min_survivors} survivors would reach epsilon "
            f"{after:.3f} > budget {self.budget} (distributed DP, spent {ddp.epsilon:.3f}, delta={ddp.delta:g})"
        )

    def charge_asked(self, round_number: int, names: Iterable[str]) -> list[str]:
        """Local DP: one participation for each client asked in `round_number` not yet charged for it;
        returns those newly charged (none without local DP)."""
        if self.clients is None:
            return []
        if round_number != self.charged_round:
            self.charged_round, self.charged = round_number, set()
        new = sorted(set(names) - self.charged)
        self.clients.record(new)
        self.charged.update(new)
        return new

    def charge_release(self, rate: float) -> dict[str, Any]:
        """Charge one aggregated round drawn at sampling rate `rate`; the round-log fields."""
        if self.ledger is None or self.noise_multiplier is None:
            return {}
        released = self.ledger.step(self.noise_multiplier, rate)
        if self.clients is None:
            return {"epsilon": released, "sample_rate": rate}
        return {
            "epsilon": self.clients.worst(),
            "epsilon_clients": self.clients.distribution(),
            "epsilon_released_model": released,
            "sample_rate": rate,
        }

    def budget_problem(self, rate: float | None) -> str | None:
        """Why one more round drawn at `rate` would pass `privacy.epsilon_budget` (None: it would not).

        `rate` None is the planning check before any client joined: the configured m / N stands in for
        the rate, which only the pool the round is drawn from will fix."""
        z, cl, ledger = self.noise_multiplier, self.clients, self.ledger
        if self.distributed is not None:
            return self._distributed_problem()
        if cl is not None:
            if not cl.would_exceed():
                return None
            most = max(cl.participations.values(), default=0)
            return (
                f"privacy budget: one more participation of the most-selected client ({most} so far) at noise "
                f"multiplier {z} would reach its epsilon {cl.epsilon_for(most + 1):.3f} > budget {cl.budget} "
                f"(local DP: q = 1 against the coordinator, delta={cl.delta:g})"
            )
        if z is None or ledger is None or ledger.budget is None:
            return None
        q = self.planned_rate if rate is None else rate
        if not ledger.would_exceed(z, q):
            return None
        which = "the configured rate m / N" if rate is None else "the clients connected now"
        return (
            f"privacy budget: one more round at noise multiplier {z} and sampling rate {q:g} ({which}) "
            f"would reach epsilon {ledger.epsilon_after(z, q):.3f} > budget {ledger.budget} "
            f"(spent {ledger.epsilon():.3f}, delta={ledger.delta:g})"
        )

    def retry_problem(self, rate: float) -> str | None:
        """Why raising the open round's sampling rate to `rate` (a retry) would pass the budget."""
        z, ledger = self.noise_multiplier, self.ledger
        if self.clients is not None or z is None or ledger is None or not ledger.would_exceed(z, rate):
            return None
        return (
            f"privacy budget: a retry would raise the round's sampling rate to {rate:g} and its epsilon to "
            f"{ledger.epsilon_after(z, rate):.3f} > budget {ledger.budget} (delta={ledger.delta:g}); "
            "the round's updates were not released"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict() if self.ledger else None,
            "client_ledger": self.clients.state_dict() if self.clients else None,
            "distributed_ledger": self.distributed.state_dict() if self.distributed else None,
            "charged_round": {"round": self.charged_round, "clients": sorted(self.charged)},
        }

    def load_state_dict(self, state: Mapping[str, Any], rounds_done: int) -> None:
        """Restore the ledgers; a checkpoint without per-client counts charges one client every round."""
        if self.ledger is not None and state.get("ledger"):
            self.ledger.load_state_dict(state["ledger"])
        if self.distributed is not None and state.get("distributed_ledger"):
            self.distributed = DistributedLedger.from_state(state["distributed_ledger"])
        if self.clients is not None and state.get("client_ledger"):
            self.clients.load_state_dict(state["client_ledger"])
        elif self.clients is not None and rounds_done:
            self.clients.participations = {"(rounds before per-client counts)": rounds_done}
        charged = state.get("charged_round") or {}
        self.charged_round = int(charged.get("round", 0))
        self.charged = {str(n) for n in charged.get("clients", [])}
