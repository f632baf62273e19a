"""Accuracy under one malicious client: each aggregator on the digits MLP with one attacker
among 3 and among 10 clients, against the same aggregator with every client honest.

The attacker trains honestly, then its `SubmitUpdateRequest` is rewritten before the coordinator
sees it (`gradcomp.sim.attack`), either in the last round only (no honest round left to recover:
the damage one update does) or in every round (a persistent attacker):
- `norm`: its update negated and scaled to L2 norm 1e6 (a boosted model-replacement attack);
- `examples`: its update negated at its own norm, claiming the most examples the job accepts
  (1e6 under the old limits, `limits.max_examples` = 10000 under the defaults: a larger claim is refused).

Aggregators: `fedavg (no limits)` (the old limits: max_examples 1e6, no weight cap, no norm bound:
the attacks as reported), `fedavg` (the defaults: max_update_norm 10, max_weight_share 0.5,
max_examples 10000), `norm_bounded`, `median`, `trimmed_mean` (each with the defaults). The
simulation is `gradcomp fedsim`'s in the driver (simulation.actors 0, no Ray), through the real
coordinator core, with the local training of examples/fedsim-digits.yaml (5 epochs, batch 16,
lr 0.1) on IID shards; the final accuracy is the mean over seeds.

    python benchmarks/robustness.py --out runs/bench/robustness.json

Target: with a robust aggregator, one malicious client among 10 changes the final accuracy by
less than 2 points from the honest run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import environment, markdown_table, write_json

from gradcomp.sim.attack import Attack, AttackPool
from gradcomp.sim.setup import build_simulation, fedsim_job, make_pool

LEGACY_LIMITS = {"max_examples": 1_000_000, "max_weight_share": 1.0, "max_update_norm": 1e30}
AGGREGATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg (no limits)": ("fedavg", LEGACY_LIMITS),
    "fedavg": ("fedavg", {}),
    "norm_bounded": ("norm_bounded", {}),
    "median": ("median", {}),
    "trimmed_mean": ("trimmed_mean", {}),
}
# (attack kind, attacked rounds: "last" or "every"); None is the honest run
SCENARIOS: dict[str, tuple[str, str] | None] = {
    "honest": None,
    "norm 1e6, last round": ("norm", "last"),
    "norm 1e6, every round": ("norm", "every"),
    "inflated examples, last round": ("examples", "last"),
    "inflated examples, every round": ("examples", "every"),
}
LOCAL = {"epochs": 5, "batch_size": 16, "lr": 0.1}  # examples/fedsim-digits.yaml's local training
ROBUST = ("norm_bounded", "median", "trimmed_mean")
TARGET_POINTS = 2.0


def final_accuracy(clients: int, aggregator: str, scenario: str, seed: int, rounds: int) -> float:
    """Test accuracy of the global model after `rounds` rounds of one simulated job."""
    strategy, limits = AGGREGATORS[aggregator]
    job = fedsim_job(
        {
            "name": "bench-robustness",
            "task": {"name": "digits-mlp"},
            "rounds": rounds,
            "clients": {"expected": clients},
            "local": LOCAL,
            "strategy": strategy,
            "limits": limits,
            "seed": seed,
            "simulation": {"partition": "iid", "actors": 0, "eval_every": rounds},
        }
    )
    pool = make_pool(job, 0)
    attack = SCENARIOS[scenario]
    if attack is not None:
        kind, when = attack
        claim = min(1_000_000, job.limits.max_examples)
        only = frozenset({rounds}) if when == "last" else None
        pool = AttackPool(pool, Attack(kind, frozenset({0}), norm=1e6, num_examples=claim, rounds=only))  # type: ignore[arg-type]
    sim, _ = build_simulation(job, pool=pool, quiet=True)
    try:
        sim.run()
    finally:
        pool.close()
    return float(sim.coord.log[-1]["test_accuracy"])


def measure(clients: list[int], seeds: list[int], rounds: int, aggregators: list[str]) -> list[dict[str, Any]]:
    rows = []
    for n in clients:
        for agg in aggregators:
            row: dict[str, Any] = {"clients": n, "aggregator": agg}
            for scenario in SCENARIOS:
                accs = [final_accuracy(n, agg, scenario, s, rounds) for s in seeds]
                row[scenario] = {"per_seed": accs, "mean": statistics.mean(accs)}
                row[scenario]["change_points"] = 100 * (row[scenario]["mean"] - row["honest"]["mean"])
            rows.append(row)
            print(f"{n} clients {agg}: " + ", ".join(f"{s} {row[s]['mean']:.3f}" for s in SCENARIOS), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    attacked = list(SCENARIOS)[1:]
    body = [
        [r["clients"], r["aggregator"], f"{r['honest']['mean']:.3f}"]
        + [f"{r[s]['mean']:.3f} ({r[s]['change_points']:+.1f})" for s in attacked]
        for r in rows
    ]
    return markdown_table(["clients", "aggregator", "honest", *(f"{s} (points)" for s in attacked)], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=list(AGGREGATORS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = measure(args.clients, args.seeds, args.rounds, args.aggregators)
    print(table(rows))
    robust_10 = [r for r in rows if r["clients"] == 10 and r["aggregator"] in ROBUST]
    worst = {r["aggregator"]: min(r[s]["change_points"] for s in list(SCENARIOS)[1:]) for r in robust_10}
    write_json(
        args.out,
        {
            "benchmark": "robustness",
            "task": "digits-mlp",
            "rounds": args.rounds,
            "seeds": args.seeds,
            "local": LOCAL,
            "attacker": "client 0 (one of the clients), in the last round or in every round",
            "target": f"a robust aggregator, 10 clients: |change| < {TARGET_POINTS} points",
            "worst_change_points_10_clients": worst,
            "rows": rows,
            "seconds": time.perf_counter() - t0,
            "environment": environment(),
        },
    )


if __name__ == "__main__":
    main()
