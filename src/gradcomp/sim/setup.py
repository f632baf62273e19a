"""Setting a simulation up: the job file (with `simulation:`), the virtual clients' shards and
state, the worker pool, and the coordinator the clients report to (`build_simulation`).

Both transports start here: the in-process loop (`sim/engine.py`) and `--grpc` (`sim/grpc_mode.py`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from gradcomp.config.common import ConfigError, apply_overrides, load_yaml, validate
from gradcomp.config.fed import FedJob, SimulationConfig
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.partition import partition, skew_summary
from gradcomp.protocol.messages import training_config
from gradcomp.protocol.model import initial_params, model_spec
from gradcomp.raycluster import cluster_cpus
from gradcomp.server.core import Coordinator
from gradcomp.server.secure_round import plan_for
from gradcomp.sim.cohort import why_not_vectorizable
from gradcomp.sim.engine import Simulation, VirtualClock
from gradcomp.sim.keys import coordinator_secret, simulation_secret
from gradcomp.sim.pool import ClientPool, LocalPool, RayPool
from gradcomp.sim.state import ClientTable, client_name
from gradcomp.sim.timing import NO_TIMINGS, Timings
from gradcomp.tasks import Task, load_task


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


def client_config(job: FedJob) -> LocalTrainingConfig:
    """What every virtual client trains with: the `TrainingConfig` a real client would receive (under
    secure aggregation with the coordinator's plan for the task's model)."""
    plan = None
    if job.secure_aggregation is not None:
        plan = plan_for(job, model_spec(initial_params(load_task(job.task.name, **job.task.args), job.seed)))
    return LocalTrainingConfig.from_pb(training_config(job, plan.encoding if plan is not None else None))


def make_pool(job: FedJob, actors: int | None, timings: Timings = NO_TIMINGS) -> ClientPool:
    """`actors` 0: in the driver; None: one Ray actor per CPU of the cluster (at most one per client).
    `timings` gets the pool's parts (sim/timing.py)."""
    vectorize = (job.simulation or SimulationConfig()).vectorize
    secret = simulation_secret(job)
    if actors == 0:
        return LocalPool(client_config(job), secret, vectorize, timings)
    n = actors if actors is not None else cluster_cpus()
    return RayPool(client_config(job), secret, max(1, min(n, job.clients.expected)), vectorize, timings)


def make_clients(job: FedJob, quiet: bool = False) -> tuple[ClientTable, Task]:
    """Partition the task's training set over the virtual clients (skew summary printed); (clients, task).
    A model the clients cannot train the way `simulation.vectorize` asks is refused or routed here."""
    sim = job.simulation or SimulationConfig()
    task = load_task(job.task.name, **job.task.args)
    reason = sequential_reason(job, task)
    if reason is not None and not quiet:
        print(f"clients train one at a time: {reason}", flush=True)
    labels = task.labels().numpy()
    groups = task.groups.numpy() if task.groups is not None else None
    parts = partition(labels, job.clients.expected, sim.partition, seed=job.seed, groups=groups)
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


def sequential_reason(job: FedJob, task: Task) -> str | None:
    """Why the clients will train one after another (None: cohorts train vectorised), as the pool's
    runners will decide it (`sim/client.py`). A model that cannot train vectorised under
    `vectorize: on` is refused here, naming the layer, before any pool or client starts."""
    sim = job.simulation or SimulationConfig()
    if sim.vectorize == "off":
        return "simulation.vectorize is off"
    reason = why_not_vectorizable(task.make_model())
    if reason is None and job.local.steps:
        reason = "local.steps (fixed-work mode) trains one client at a time"
    if reason is not None and sim.vectorize == "on":
        raise ConfigError(f"simulation.vectorize is on, but {reason}")
    return reason


def build_simulation(
    job: FedJob, *, pool: ClientPool | None = None, quiet: bool = False, timings: Timings = NO_TIMINGS
) -> tuple[Simulation, Any]:
    """Partition the data, make the clients, the coordinator and the pool; returns (simulation, task).
    `timings` gets every part of a round, the pool's included when the pool is made here (sim/timing.py)."""
    sim = job.simulation or SimulationConfig()
    table, task = make_clients(job, quiet)
    eval_model = task.make_model()
    last = job.rounds

    def evaluate_global(params: dict[str, torch.Tensor]) -> dict[str, float]:
        version = coord.version
        if task.test_set is None or (version % sim.eval_every and version != last):
            return {}
        eval_model.load_state_dict(params, strict=False)
        return task.evaluate(eval_model)

    clock = VirtualClock()
    names = [client_name(i) for i in range(len(table))]
    params = initial_params(task, job.seed)
    secret = coordinator_secret(simulation_secret(job))
    coord = Coordinator(job, params, evaluate=evaluate_global, clock=clock, client_names=names, secret=secret)
    for name in names:
        coord.register(name, clock.now)
    if pool is None:
        pool = make_pool(job, sim.actors, timings)
    return Simulation(job, sim, coord, clock, pool, table, timings), task


def release(pool: ClientPool | None, started_ray: bool) -> None:
    """Close the pool (its actors would outlive ray.shutdown() in a cluster we joined), then Ray if we started it."""
    if pool is not None:
        pool.close()
    if started_ray:
        import ray  # only when this process started Ray: importing it costs seconds

        ray.shutdown()
