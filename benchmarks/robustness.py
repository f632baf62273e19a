"""Robust aggregation against one malicious client, on the digits task.

For each aggregator and for 3 and 10 clients, the same seeded federated run three times: all
honest; one client sending an update of L2 norm 1e6 (a random direction) in the last round; one
client claiming `limits.max_examples` examples for its honest update with the sign flipped (an
ordinary-sized update that undoes the round). The attack is in the final round, so the final
accuracy shows it with no honest round to recover. Updates go through the real coordinator
(`server.core.Coordinator`: validation, the server-side norm bound, the weight-share cap, the
strategy), only without gRPC. `fedavg (no limits)` is FedAvg with the bounds of issue 14 off
(no norm bound, no share cap, max_examples 10^6): the attacks as they were reported.

    python benchmarks/robustness.py --out runs/bench/robustness.json

Target: with a robust aggregator, one malicious client among 10 changes the final accuracy by
less than 2 points from the honest run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import environment, markdown_table, write_json

from gradcomp.compression.payload import Dense
from gradcomp.config.fed import FedJob
from gradcomp.fedclient.data import iid_shard
from gradcomp.fedclient.train import SGDConfig, train_one
from gradcomp.protocol.model import initial_params
from gradcomp.server.core import Coordinator
from gradcomp.strategies.aggregate import global_norm
from gradcomp.tasks import evaluate, load_task

AGGREGATORS = {
    "fedavg (no limits)": ({"name": "fedavg"}, {"max_update_norm": 1e30, "max_weight_share": 1.0,
                                                "max_examples": 1_000_000}),
    "fedavg": ({"name": "fedavg"}, {}),
    "norm_bounded": ({"name": "norm_bounded"}, {}),
    "trimmed_mean": ({"name": "trimmed_mean"}, {}),
    "median": ({"name": "median"}, {}),
}  # fmt: skip
ATTACKS = ("none", "norm", "examples")
TARGET_POINTS = 2.0


def make_job(clients: int, rounds: int, strategy: dict[str, Any], limits: dict[str, Any]) -> FedJob:
    return FedJob.model_validate({
        "name": "robustness", "task": {"name": "digits-mlp"}, "rounds": rounds,
        "clients": {"expected": clients, "min": clients}, "round": {"min_clients": clients},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.1}, "strategy": strategy, "limits": limits,
    })  # fmt: skip


def malicious(attack: str, honest: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    if attack == "norm":
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(v.shape, generator=gen) for k, v in honest.items()}
        scale = 1e6 / global_norm(noise)
        return {k: v * scale for k, v in noise.items()}
    return {k: -v for k, v in honest.items()}  # "examples": ordinary size, claimed with max_examples


def run(clients: int, rounds: int, aggregator: str, attack: str, seed: int = 0) -> dict[str, Any]:
    strategy, limits = AGGREGATORS[aggregator]
    job = make_job(clients, rounds, strategy, limits)
    task = load_task("digits-mlp")
    model = task.make_model()
    coord = Coordinator(job, initial_params(task, seed))
    names = [f"client-{i}" for i in range(clients)]
    shards = {n: iid_shard(task, i, clients, seed) for i, n in enumerate(names)}
    sgd = SGDConfig(job.local.epochs, job.local.batch_size, job.local.lr, job.local.momentum)
    for n in names:
        coord.register(n)
    for number in range(1, rounds + 1):
        assert coord.select_clients() is not None
        params = coord.params
        for i, n in enumerate(names):
            model.load_state_dict(params, strict=False)
            local, _, _ = train_one(model, shards[n].x, shards[n].y, sgd, seed * 7919 + number * 101 + i)
            delta = {k: local[k].detach().float() - params[k] for k in params}
            examples = shards[n].num_examples
            if i == 0 and attack != "none" and number == rounds:
                delta = malicious(attack, delta, seed + number)
                examples = job.limits.max_examples if attack == "examples" else examples
            update = {k: Dense(v.reshape(-1), tuple(v.shape), v.dtype) for k, v in delta.items()}
            coord.accept_update(n, number, examples, update)
        assert coord.finish_round() is not None, "the round did not aggregate"
    model.load_state_dict(coord.params, strict=False)
    return {"clients": clients, "aggregator": aggregator, "attack": attack,
            "accuracy": round(float(evaluate(model, task.test_set)["accuracy"]), 4)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [run(n, args.rounds, agg, attack) for n in args.clients for agg in AGGREGATORS for attack in ATTACKS]
    honest = {(r["clients"], r["aggregator"]): r["accuracy"] for r in results if r["attack"] == "none"}
    for r in results:
        r["change_points"] = round(100 * (r["accuracy"] - honest[(r["clients"], r["aggregator"])]), 2)
    robust_10 = [r for r in results if r["clients"] == 10 and r["aggregator"] in ("median", "trimmed_mean",
                                                                                  "norm_bounded")]  # fmt: skip
    met = all(abs(r["change_points"]) < TARGET_POINTS for r in robust_10) if robust_10 else None
    rows = []
    for n in args.clients:
        for agg in AGGREGATORS:
            cell = {r["attack"]: r for r in results if r["clients"] == n and r["aggregator"] == agg}
            attacked = [f"{cell[a]['accuracy']:.3f} ({cell[a]['change_points']:+.1f})" for a in ATTACKS[1:]]
            rows.append([n, agg, f"{cell['none']['accuracy']:.3f}", *attacked])
    print(markdown_table(["clients", "aggregator", "honest", "norm 1e6 (points)", "max_examples, flipped (points)"],
                         rows))  # fmt: skip
    write_json(args.out, {
        "benchmark": "robustness", "task": "digits-mlp", "rounds": args.rounds, "attack_round": args.rounds,
        "target": f"robust aggregators, 10 clients: |change| < {TARGET_POINTS} points", "target_met": met,
        "results": results, "seconds": round(time.perf_counter() - t0, 1), "environment": environment(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
