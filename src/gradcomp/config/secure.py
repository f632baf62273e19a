"""The `secure_aggregation:` section of a federated job: SecAgg+ settings and distributed DP's noise.

With it, the coordinator learns only the sum of a round's surviving clients' updates (`secagg/`). Each
client clips its update to `clip`, scales by `scale`, rounds it (conditional stochastic rounding) and,
with `privacy.mode: distributed`, adds discrete Gaussian noise sized so that `min_survivors` clients
carry `privacy.noise_multiplier` between them (`secagg/ddp.py`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gradcomp.config.common import StrictModel


class SecureAggregationSection(StrictModel):
    """SecAgg+ (Bell et al. 2020) for every round; unset settings are derived from the round's size."""

    bits: Literal[32, 64] = Field(32, description="ring Z_(2^bits) of the masked sums (word size on the wire)")
    clip: float | None = Field(
        None, gt=0, description="L2 bound on one client's update before quantising (default: privacy.clip)"
    )
    scale: float | None = Field(
        None,
        gt=0,
        description="quantisation scale gamma (integers per unit); default: the largest that cannot wrap with "
        "headroom for the noise",
    )
    degree: int | None = Field(
        None, ge=2, description="neighbours each client masks against (even; default ~3 log2 of the round size)"
    )
    threshold: int | None = Field(None, ge=2, description="shares to rebuild a secret (default degree/2 + 1)")
    min_survivors: int | None = Field(
        None, ge=3, description="a round with fewer masked inputs aborts before any share is revealed"
    )
    rounding_beta: float = Field(
        1e-9, gt=0, lt=1e-3, description="chance one rounding draw exceeds the sensitivity bound (it is redrawn)"
    )


SUMMABLE_STAGES = frozenset({"none", "randomk", "ef"})


def check_secure(job: Any) -> None:
    """Refuse a `FedJob` whose secure aggregation could not work or would claim too much."""
    from gradcomp.compression import parse_spec
    from gradcomp.strategies import strategy_class

    s, p = job.secure_aggregation, job.privacy
    if s is None:
        if p.mode == "distributed":
            raise ValueError("privacy.mode distributed adds noise under secure aggregation: add secure_aggregation:")
        return
    if p.mode in ("local", "central"):
        raise ValueError(
            f"secure_aggregation goes with privacy.mode none or distributed, not {p.mode}: the coordinator sees "
            "only sums, so it can neither clip each update (central) nor needs clients to noise alone (local)"
        )
    if p.mode == "distributed" and (p.clip is None or not p.noise_multiplier):
        raise ValueError("privacy.mode distributed needs privacy.clip and privacy.noise_multiplier > 0")
    if s.clip is None and p.clip is None:
        raise ValueError("secure_aggregation needs a clip: secure_aggregation.clip or privacy.clip")
    if s.clip is not None and p.clip is not None and s.clip != p.clip:
        raise ValueError(f"secure_aggregation.clip ({s.clip}) and privacy.clip ({p.clip}) disagree: give one")
    stages = [st.name for st in parse_spec(job.compression)]
    if not set(stages) <= SUMMABLE_STAGES:
        raise ValueError(
            f"compression {job.compression!r} cannot be summed under masks (each client would send other "
            "coordinates or a non-linear encoding): use none, or randomk(ratio=..., seed=...) (every client "
            "keeps the same coordinates in a round), optionally with ef"
        )
    strategy = strategy_class(job.strategy.name)
    if not strategy.aggregates_by_mean() or strategy.client_half.update_names(["x"]):
        raise ValueError(
            f"strategy {job.strategy.name!r} needs each client's update (or sends extras beside it); under "
            "secure aggregation the coordinator sees only their mean: use fedavg, fedavgm, fedadam or fedprox"
        )
