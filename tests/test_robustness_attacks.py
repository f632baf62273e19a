"""Model poisoning by one authenticated client (a huge update; an inflated example count),
reproduced on the real coordinator with the digits task
(`gradcomp fedsim` in the driver, 3 clients, one malicious): the legacy limits let one client
wreck the model; the new limits and a robust aggregator hold. The attacker's real
`SubmitUpdateRequest` bytes are rewritten after honest training (`gradcomp.sim.attack`)."""

from __future__ import annotations

from typing import Any

from gradcomp.sim.attack import Attack, AttackPool
from gradcomp.sim.engine import Simulation
from gradcomp.sim.setup import build_simulation, fedsim_job, make_pool

LEGACY_LIMITS = {"max_examples": 1_000_000, "max_weight_share": 1.0, "max_update_norm": 1e30}
ROUNDS = 6


def _run(strategy: str, limits: dict[str, Any], attack: Attack | None) -> Simulation:
    job = fedsim_job(
        {
            "task": {"name": "digits-mlp"},
            "rounds": ROUNDS,
            "clients": {"expected": 3},
            "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
            "strategy": strategy,
            "limits": limits,
            "simulation": {"actors": 0, "eval_every": ROUNDS},
        }
    )
    pool = make_pool(job, 0)
    sim, _ = build_simulation(job, pool=pool if attack is None else AttackPool(pool, attack), quiet=True)
    sim.run()
    assert sim.coord.status == "finished"
    return sim


def _accuracy(sim: Simulation) -> float:
    return float(sim.coord.log[-1]["test_accuracy"])


def test_an_update_of_norm_1e6_is_bounded_and_the_median_ignores_it() -> None:
    honest = _accuracy(_run("fedavg", {}, None))
    assert honest > 0.8
    attack = Attack("norm", frozenset({0}), norm=1e6)
    assert _accuracy(_run("fedavg", LEGACY_LIMITS, attack)) < 0.2  # legacy limits: one update wrecks FedAvg
    sim = _run("median", {}, attack)
    assert sum(e["clipped"] for e in sim.coord.log) == ROUNDS  # the server bound caught every malicious update
    assert isinstance(sim.pool, AttackPool) and sim.pool.tampered == ROUNDS
    assert _accuracy(sim) > honest - 0.05


def test_a_claim_of_a_million_examples_is_refused_and_capped_claims_do_not_take_over() -> None:
    honest = _accuracy(_run("fedavg", {}, None))
    million = Attack("examples", frozenset({0}), num_examples=1_000_000)
    assert _accuracy(_run("fedavg", LEGACY_LIMITS, million)) < 0.2  # legacy limits: the claim outweighs the rest
    refused = _run("fedavg", {}, million)  # the default limits.max_examples refuses the claim outright
    log = refused.coord.log
    assert all(e["clients"] == 2 for e in log)
    # Refused twice in a row, the attacker is benched (round.bench_after_misses = 2) and asked no more.
    assert [e["rejected"] for e in log[:2]] == [{"malformed": 1}] * 2 and log[1]["benched"] == ["sim-0"]
    assert all(e["rejected"] == {} and e["selected"] == 2 for e in log[2:])
    assert _accuracy(refused) > honest - 0.05
    largest = Attack("examples", frozenset({0}), num_examples=refused.job.limits.max_examples)
    assert _accuracy(_run("trimmed_mean", {}, largest)) > honest - 0.05  # the largest accepted claim
