"""Federated simulation throughput and memory: client updates per second and peak RSS (driver + actors)
for 100 and 1000 virtual clients (digits MLP, 10% of the clients per round), dense vs rtopk(0.01)+ef.

Each configuration runs in its own driver process (so its peak RSS is its own) against one Ray
instance started here; the actor pool is created fresh per configuration. Target: 1000 clients
in under 2 GiB of peak memory (driver + actors).

    python benchmarks/fedsim.py --out runs/bench/fedsim.json           # or: gradcomp bench fedsim
    python benchmarks/fedsim.py --clients 100 1000 --updates 300 --actors 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SPECS = {"dense": "none", "rtopk0.01+ef": "rtopk(ratio=0.01, r=0.05) | ef"}
GIB = 1024**3


def job_data(clients: int, spec: str, rounds: int, actors: int) -> dict:
    return {
        "name": "bench-fedsim",
        "task": {"name": "digits-mlp"},
        "rounds": rounds,
        "clients": {"expected": clients},
        "round": {"fraction": 0.1, "min_clients": 1, "deadline_seconds": 60},
        "local": {"epochs": 5, "batch_size": 16, "lr": 0.1},
        "compression": spec,
        "seed": 0,
        "simulation": {"partition": "iid", "actors": actors, "eval_every": rounds},
    }


def one(job_path: str, address: str) -> dict:
    """Run one configuration in this process (connected to `address`) and measure it."""
    from gradcomp.raycluster import connect
    from gradcomp.sim.pool import peak_rss_bytes
    from gradcomp.sim.setup import build_simulation, load_fedsim_job

    connect(address)
    job = load_fedsim_job(job_path)
    sim, _ = build_simulation(job, quiet=True)
    # warm-up round: actors import torch and load the task once; not counted
    sim.run_round()
    trained0, t0 = sim.updates_trained, time.perf_counter()
    accuracy = None
    while not sim.coord.done:
        entry, _ = sim.run_round()
        if entry is not None and "test_accuracy" in entry:
            accuracy = entry["test_accuracy"]
    seconds = time.perf_counter() - t0
    updates = sim.updates_trained - trained0
    actors = sim.pool.peak_rss()
    driver = peak_rss_bytes()
    out = {
        "clients": job.clients.expected,
        "per_round": job.clients_per_round,
        "spec": job.compression,
        "actors": sim.pool.size,
        "timed_rounds": job.rounds - 1,
        "updates": updates,
        "seconds": round(seconds, 3),
        "updates_per_second": round(updates / seconds, 2),
        "uplink_bytes": sim.coord.totals["uplink_bytes"],
        "dense_bytes": sim.coord.totals["dense_bytes"],
        "client_state_bytes": sim.clients.nbytes(),
        "peak_rss_driver_bytes": driver,
        "peak_rss_actors_bytes": sum(actors),
        "peak_rss_total_bytes": driver + sum(actors),
        "final_accuracy": accuracy,
    }
    sim.pool.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--updates", type=int, default=300, help="timed client updates per configuration (about)")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--out", default=None, help="write the JSON here as well")
    p.add_argument("--one", nargs=2, metavar=("JOB", "ADDRESS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(*args.one)), flush=True)
        return 0

    import ray

    from gradcomp.raycluster import connect

    connect(num_cpus=args.actors)
    address = ray.get_runtime_context().gcs_address
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for clients in args.clients:
                for label, spec in SPECS.items():
                    path = Path(tmp) / f"{clients}-{label}.yaml"
                    rounds = 1 + -(-args.updates // max(1, round(0.1 * clients)))  # + 1 warm-up round
                    path.write_text(yaml.safe_dump(job_data(clients, spec, rounds, args.actors)))
                    proc = subprocess.run(
                        [sys.executable, __file__, "--one", str(path), address],
                        capture_output=True,
                        text=True,
                        env={**os.environ, "RAY_ADDRESS": address},
                        check=False,
                    )
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"configuration {clients} clients / {label} failed")
                    row = {"label": label, **json.loads(line[len("RESULT ") :])}
                    rows.append(row)
                    print(f"{clients:>5} clients {label:>13}: {row['updates_per_second']:.1f} updates/s, "
                          f"peak {row['peak_rss_total_bytes'] / GIB:.2f} GiB", flush=True)  # fmt: skip
    finally:
        ray.shutdown()
    for clients in args.clients:
        base = next(r for r in rows if r["clients"] == clients and r["label"] == "dense")
        for r in rows:
            if r["clients"] == clients:
                r["speed_vs_dense"] = round(r["updates_per_second"] / base["updates_per_second"], 3)
                r["uplink_vs_dense"] = round(r["uplink_bytes"] / base["uplink_bytes"], 4)
    result = {
        "benchmark": "fedsim",
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "target": "1000 clients under 2 GiB peak (driver + actors)",
        "target_met": all(r["peak_rss_total_bytes"] < 2 * GIB for r in rows if r["clients"] >= 1000),
    }
    text = json.dumps(result, indent=2)
    print(text)
    print(f"\n{'clients':>7} {'spec':>13} {'upd/s':>8} {'vs dense':>8} {'driver GiB':>10} {'actors GiB':>10} "
          f"{'total GiB':>9} {'state MiB':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['clients']:>7} {r['label']:>13} {r['updates_per_second']:>8.1f} {r['speed_vs_dense']:>8.2f} "
            f"{r['peak_rss_driver_bytes'] / GIB:>10.2f} {r['peak_rss_actors_bytes'] / GIB:>10.2f} "
            f"{r['peak_rss_total_bytes'] / GIB:>9.2f} {r['client_state_bytes'] / 2**20:>9.2f}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
