"""`gradcomp fedsim FED.yaml`: simulate a federated job's clients on a Ray actor pool.

The job file is the same one `gradcomp serve` takes, plus an optional `simulation:` section
(virtual clients, partition, dropout, stragglers, actors). The coordinator is the real one
(`server.core.Coordinator`): same strategy, validation, accountant and metrics; updates are
the real protobuf messages. With `--grpc` the clients talk to the real gRPC service on
127.0.0.1 instead (see sim/grpc_mode.py).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradcomp import metrics
from gradcomp.config.common import ConfigError, apply_overrides, load_yaml, validate
from gradcomp.config.fed import FedJob, SimulationConfig
from gradcomp.partition import partition, skew_summary
from gradcomp.protocol.model import initial_params
from gradcomp.results import RunRecord, human_bytes, print_summary
from gradcomp.sim.client import LocalConfig
from gradcomp.sim.engine import RoundStats, Simulation, VirtualClock, client_name
from gradcomp.sim.pool import ClientPool, LocalPool, RayPool, peak_rss_bytes
from gradcomp.sim.state import ClientTable


def load_fedsim_job(path: str | Path, overrides: list[str] | None = None) -> FedJob:
    """Load a federated job file (plus `--set` overrides) for simulation; see `fedsim_job`."""
    return fedsim_job(apply_overrides(load_yaml(path), overrides), source=str(path))


def fedsim_job(data: dict[str, Any], source: str = "job") -> FedJob:
    """Validate federated job data for simulation. `simulation.clients`, when given, is the population
    (clients.expected); giving both with different values is an error, since the DP sampling
    rate m / N uses clients.expected. `data` itself is left as it is."""
    data = copy.deepcopy(data)
    sim = data.get("simulation") or {}
    if isinstance(sim, dict) and sim.get("clients") is not None:
        clients = data.setdefault("clients", {}) if isinstance(data.get("clients", {}), dict) else None
        if clients is None:
            raise ConfigError(f"{source}: clients must be a section")
        expected = clients.get("expected")
        if expected is not None and expected != sim["clients"]:
            raise ConfigError(
                f"{source}: simulation.clients ({sim['clients']}) disagrees with clients.expected ({expected}); "
                "give one of them (the simulation's population is clients.expected)"
            )
        clients["expected"] = sim["clients"]
    job = validate(FedJob, data, source=source)
    if job.simulation is None:
        job.simulation = SimulationConfig()
    return job


def local_config(job: FedJob) -> LocalConfig:
    return LocalConfig(
        task=job.task.name,
        task_args=dict(job.task.args),
        spec=job.client_spec(),
        epochs=job.local.epochs,
        batch_size=job.local.batch_size,
        lr=job.local.lr,
        momentum=job.local.momentum,
        vectorize=(job.simulation or SimulationConfig()).vectorize,
    )


def make_pool(job: FedJob, actors: int | None) -> ClientPool:
    """`actors` 0: in the driver; None: one Ray actor per CPU of the cluster (at most one per client)."""
    if actors == 0:
        return LocalPool(local_config(job))
    from gradcomp.raycluster import cluster_cpus

    n = actors if actors is not None else cluster_cpus()
    return RayPool(local_config(job), max(1, min(n, job.clients.expected)))


def make_clients(job: FedJob, quiet: bool = False) -> tuple[ClientTable, Any]:
    """Partition the task's training set over the virtual clients (skew summary printed); (clients, task)."""
    from gradcomp.tasks import load_task

    sim = job.simulation or SimulationConfig()
    task = load_task(job.task.name, **job.task.args)
    labels = task.labels().numpy()
    parts = partition(labels, job.clients.expected, sim.partition, seed=job.seed)
    if not quiet:
        print(skew_summary(labels, parts).format(sim.partition), flush=True)
    table = ClientTable.build(
        parts,
        dropout=sim.dropout,
        dropout_spread=sim.dropout_spread,
        straggler_fraction=sim.stragglers.fraction,
        seed=job.seed,
    )
    return table, task


def build_simulation(job: FedJob, *, pool: ClientPool | None = None, quiet: bool = False) -> tuple[Simulation, Any]:
    """Partition the data, make the clients, the coordinator and the pool; returns (simulation, task)."""
    from gradcomp.server.core import Coordinator
    from gradcomp.tasks import evaluate

    sim = job.simulation or SimulationConfig()
    table, task = make_clients(job, quiet)
    eval_model = task.make_model()
    last = job.rounds

    def evaluate_global(params: dict[str, torch.Tensor]) -> dict[str, float]:
        version = coord.version
        if task.test_set is None or (version % sim.eval_every and version != last):
            return {}
        eval_model.load_state_dict(params, strict=False)
        return evaluate(eval_model, task.test_set)

    clock = VirtualClock()
    names = [client_name(i) for i in range(len(table))]
    coord = Coordinator(job, initial_params(task, job.seed), evaluate=evaluate_global, clock=clock, client_names=names)
    for name in names:
        coord.register(name, clock.now)
    if pool is None:
        pool = make_pool(job, sim.actors)
    return Simulation(job, sim, coord, clock, pool, table), task


def run_fedsim(args: argparse.Namespace) -> int:
    job = load_fedsim_job(args.job, getattr(args, "overrides", []))
    if getattr(args, "grpc", False):
        job.simulation.grpc = True  # type: ignore[union-attr]
    if args.check:
        sim = job.simulation
        assert sim is not None
        print(
            f"{args.job}: ok ({job.clients.expected} clients, {job.clients_per_round} per round, {job.rounds} rounds, "
            f"partition {sim.partition}, spec {job.client_spec()!r}, grpc={sim.grpc})"
        )
        return 0
    address, show = getattr(args, "address", None), getattr(args, "progress", True)
    port = getattr(args, "metrics_port", None)
    if port is not None:  # served here for both modes, not (also) by the --grpc mode's coordinator
        job.server.metrics_port = None
    # The coordinator updates gradcomp.metrics in process, exactly as under `gradcomp serve`.
    with metrics.exposed(port, linger=job.server.metrics_linger_seconds, who="gradcomp fedsim"):
        return simulate(job, Path(args.runs_dir), address=address, show=show)


def simulate(job: FedJob, runs_dir: Path, *, address: str | None = None, show: bool = True) -> int:
    """Run a validated simulation job (in process, or over gRPC with `simulation.grpc`), writing
    runs_dir/<name>/results.json; 0 when the job finished, 1 when it failed. `address`: a Ray
    cluster to join (else a local Ray starts when actors are used); `show`: progress on stdout."""
    if job.simulation is not None and job.simulation.grpc:
        from gradcomp.sim.grpc_mode import run_grpc_simulation

        return run_grpc_simulation(job, runs_dir, address=address, show=show)
    return _run_in_process(job, runs_dir, address=address, show=show)


def _run_in_process(job: FedJob, runs_dir: Path, *, address: str | None, show: bool) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gradcomp.raycluster import connect

    sim_cfg = job.simulation or SimulationConfig()
    started_ray = connect(address) if sim_cfg.actors != 0 else False
    run_dir = runs_dir / job.name
    record = RunRecord(run_dir, job.name, "fedsim", job.model_dump(mode="json"))
    t0 = time.time()
    pool: ClientPool | None = None
    try:
        sim, _task = build_simulation(job, quiet=not show)
        pool = sim.pool
        totals = {"uplink": 0, "sent": 0, "messages": 0, "downlink": 0, "dropped": 0, "late": 0}

        def on_round(entry: dict[str, Any], stats: RoundStats) -> None:
            totals["uplink"] += entry["uplink_bytes"]
            totals["sent"] += stats.payload_bytes_sent
            totals["messages"] += stats.message_bytes_sent
            totals["downlink"] += stats.downlink_bytes
            totals["dropped"] += stats.dropped
            totals["late"] += stats.late
            row = dict(entry)
            if "test_accuracy" in row:
                row["accuracy"] = row["test_accuracy"]
            row.update(
                uplink_bytes_total=totals["uplink"],
                uplink_sent_bytes=stats.payload_bytes_sent,
                uplink_message_bytes=stats.message_bytes_sent,
                downlink_bytes=stats.downlink_bytes,
                trained=stats.trained,
                dropped=stats.dropped,
                late=stats.late,
                virtual_seconds=round(sim.clock.now, 3),
                wall_seconds=round(time.time() - t0, 3),
            )
            record.set_privacy(sim.coord.epsilon, job.privacy.delta if sim.coord.ledger else None)
            record.log(row, bytes_sent=entry["uplink_bytes"], dense_bytes=entry["dense_bytes"])
            if show:
                acc = f" acc {row['accuracy']:.4f}" if "accuracy" in row else ""
                eps = f" eps {row['epsilon']:.2f}" if "epsilon" in row else ""
                if entry["round"] % max(1, job.rounds // 20) == 0 or entry["round"] == job.rounds:
                    extra = f" dropped {stats.dropped} late {stats.late}" if stats.dropped or stats.late else ""
                    progress.console.print(
                        f"round {entry['round']:>4}: {entry['clients']} updates{acc}{eps} "
                        f"uplink {human_bytes(entry['uplink_bytes'])}{extra}"
                    )
                progress.update(bar, completed=entry["round"])

        with Progress(
            TextColumn("[bold]fedsim {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(),
            disable=not show,
        ) as progress:
            bar = progress.add_task(job.name, total=job.rounds)
            sim.run(on_round)
        rss = [peak_rss_bytes(), *sim.pool.peak_rss()]
        coord = sim.coord
        final: dict[str, Any] = {
            "status": coord.status,
            "rounds": coord.version,
            "updates_trained": sim.updates_trained,
            "updates_accepted": coord.totals["accepted"],
            "updates_rejected": coord.totals["rejected"],
            "uplink_message_bytes_total": totals["messages"],
            "downlink_bytes_total": totals["downlink"],
            "dropped_total": totals["dropped"],
            "late_total": totals["late"],
            "actors": sim.pool.size if sim_cfg.actors != 0 else 0,
            "vectorized": bool(getattr(sim.pool, "vectorized", False)),
            "peak_rss_driver_bytes": rss[0],
            "peak_rss_actors_bytes": int(np.sum(rss[1:])) if len(rss) > 1 else 0,
            "client_state_bytes": sim.clients.nbytes(),
        }
        last_eval = next((e for e in reversed(coord.log) if "test_accuracy" in e), None)
        if last_eval is not None:
            final["accuracy"] = last_eval["test_accuracy"]
            final["loss"] = last_eval.get("test_loss")
        record.set_privacy(coord.epsilon, job.privacy.delta if coord.ledger else None)
        results = record.finish(**final)
    finally:
        if pool is not None:  # on every path: actors in a cluster we joined outlive ray.shutdown() otherwise
            pool.close()
        if started_ray:
            import ray

            ray.shutdown()
    if show:
        print_summary(results)
    if coord.status == "failed":
        print(f"gradcomp fedsim: the job failed: {coord.reason}")
        return 1
    return 0
