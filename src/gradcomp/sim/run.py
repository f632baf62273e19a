"""`gradcomp fedsim FED.yaml`: simulate a federated job's clients on a Ray actor pool.

The job file is the same one `gradcomp serve` takes, plus an optional `simulation:` section
(virtual clients, partition, dropout, stragglers, actors). The coordinator is the real one
(`server.core.Coordinator`): same strategy, validation, accountant and metrics; updates are
the real protobuf messages built by the shared client runtime (`fedclient/`). With `--grpc`
the clients talk to the real gRPC service on 127.0.0.1 instead (see sim/grpc_mode.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradcomp import metrics
from gradcomp.config.fed import FedJob
from gradcomp.raycluster import connect
from gradcomp.results import RunRecord, print_summary
from gradcomp.sim.engine import Simulation
from gradcomp.sim.grpc_mode import run_grpc_simulation
from gradcomp.sim.reporting import RoundReport
from gradcomp.sim.setup import build_simulation, load_fedsim_job, release


def run_fedsim(args: argparse.Namespace) -> int:
    """Handler of `gradcomp fedsim`: check the job, or run it (serving /metrics with --metrics-port)."""
    job = load_fedsim_job(args.job, getattr(args, "overrides", []))
    sim = job.simulation
    assert sim is not None  # load_fedsim_job fills it in
    if getattr(args, "grpc", False):
        sim.grpc = True
    if args.check:
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
        return run_grpc_simulation(job, runs_dir, address=address, show=show)
    return run_in_process(job, runs_dir, address=address, show=show)


def run_in_process(job: FedJob, runs_dir: Path, *, address: str | None = None, show: bool = True) -> int:
    """Run every round on a virtual clock; results.json in runs_dir/<name>/; 1 if the job failed."""
    assert job.simulation is not None
    started_ray = connect(address) if job.simulation.actors != 0 else False
    record = RunRecord(runs_dir / job.name, job.name, "fedsim", job.model_dump(mode="json"))
    sim: Simulation | None = None
    try:
        sim, task = build_simulation(job, quiet=not show)
        record.set_task(task.info)
        report = RoundReport(job, sim, record, show)
        with report.live():
            sim.run(report.on_round)
        results = record.finish(**report.final())
    finally:  # on every path: actors in a cluster we joined outlive ray.shutdown() otherwise
        release(sim.pool if sim is not None else None, started_ray)
    if show:
        print_summary(results)
    if sim.coord.status == "failed":
        print(f"gradcomp fedsim: the job failed: {sim.coord.reason}")
        return 1
    return 0
