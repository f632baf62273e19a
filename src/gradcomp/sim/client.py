"""Virtual clients' rounds on a pool worker: the shared client runtime (`fedclient/`) fed with
each client's shard and memory from the driver's compact state.

`SimClientRunner` lives inside a Ray actor (or the driver when simulation.actors is 0). It
holds the task's data and one `ClientRuntime`; everything client-specific arrives with the
call (`ClientJob`) and leaves with the result, so the worker is stateless between clients.
`run_many` trains a cohort vectorised (sim/cohort.py) when the job allows it
(`simulation.vectorize`: auto | on | off) and one client after another otherwise; `vectorized`
says which, `fallback` why not. Either way the update is built by the runtime, so both paths
send what a real client would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from gradcomp.errors import UserError
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import ClientData, dataset_view
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.fedclient.train import SGDConfig, TrainResult
from gradcomp.sim.cohort import CohortClient, CohortTrainer, why_not_vectorizable
from gradcomp.sim.keys import ClientKeys
from gradcomp.sim.state import client_name, pack_residuals, unpack_residuals, unpack_shaped
from gradcomp.sim.timing import NO_TIMINGS, Timings


@dataclass
class ClientJob:
    cid: int
    round: int
    model_version: int
    indices: np.ndarray
    ef: np.ndarray | None = None  # the client's packed residuals (None: none yet)
    strategy_state: np.ndarray | None = None  # the client's packed strategy state (None: none yet)


@dataclass
class ClientResult:
    cid: int
    round: int
    request: bytes  # serialised SubmitUpdateRequest, exactly what goes on the wire
    payload_bytes: int  # sum of the update's encoded payload sizes (compression wire format)
    num_examples: int
    ef: np.ndarray | None
    strategy_state: np.ndarray | None
    train_loss: float
    seconds: float
    secure_input: np.ndarray | None = None  # under secure aggregation: the client's ring vector


class SimClientRunner:
    """Runs virtual clients' rounds for one job; reused across thousands of clients. `secret` is the
    simulation secret each client's noise key derives from (`sim/keys.py`)."""

    def __init__(
        self,
        cfg: LocalTrainingConfig,
        secret: bytes,
        vectorize: str = "auto",
        threads: int = 1,
        timings: Timings = NO_TIMINGS,
    ):
        torch.set_num_threads(threads)
        self.timings = timings  # build requests; the cohort's steps and schedules (sim/timing.py)
        self.runtime = ClientRuntime(cfg, noise_keys=ClientKeys(secret))
        self.data = dataset_view(self.runtime.task.train_set)
        model = self.model = self.runtime.task.make_model()
        self.fallback = why_not_vectorizable(model) if vectorize != "off" else "simulation.vectorize is off"
        if self.fallback is None and cfg.steps:
            self.fallback = "local.steps (fixed-work mode) trains one client at a time"
        if vectorize == "on" and self.fallback is not None:
            raise UserError(f"simulation.vectorize is on, but {self.fallback}")
        objective = self.runtime.task.objective
        self.cohort = (
            CohortTrainer(model, self.data.dataset, SGDConfig.of(cfg), objective, self.runtime.half, timings)
            if self.fallback is None
            else None
        )

    @property
    def vectorized(self) -> bool:
        return self.cohort is not None

    def run(self, job: ClientJob, model: bytes) -> ClientResult:
        """Train one client on its own (the sequential path)."""
        t0 = time.perf_counter()
        self.runtime.load_global(job.model_version, model)
        data = self.data.subset(job.indices)
        state = unpack_shaped(job.strategy_state, self.runtime.global_params)
        result = self.runtime.train(client_name(job.cid), job.round, data, state)
        return self._finish(job, result, time.perf_counter() - t0, data)

    def run_many(self, jobs: list[ClientJob], model: bytes) -> list[ClientResult]:
        """Train a cohort (all on the same model version); results in job order."""
        if self.cohort is None or not jobs:
            return [self.run(job, model) for job in jobs]
        t0 = time.perf_counter()
        versions = {job.model_version for job in jobs}
        if len(versions) != 1:
            raise ValueError(f"a cohort trains on one model version, got {sorted(versions)}")
        rt = self.runtime
        rt.load_global(versions.pop(), model)
        seeds = [rt.seed_for(client_name(job.cid), job.round) for job in jobs]
        start = {k: v for k, v in self.model.state_dict().items() if k not in rt.global_params} | rt.global_params
        clients = [
            CohortClient(j.indices, s, rt.correction(unpack_shaped(j.strategy_state, rt.global_params)))
            for j, s in zip(jobs, seeds, strict=True)
        ]
        trained = self.cohort.train(start, clients)
        share = (time.perf_counter() - t0) / len(jobs)
        results = []
        for job, t in zip(jobs, trained, strict=True):
            params = {k: t.params.get(k, g) for k, g in rt.global_params.items()}  # untrained tensors: no change
            results.append(self._finish(job, TrainResult(params, t.train_loss, int(job.indices.size)), share))
        return results

    def _finish(
        self, job: ClientJob, result: TrainResult, seconds: float, data: ClientData | None = None
    ) -> ClientResult:
        """The runtime builds the update: local - global, compressed with the client's error feedback."""
        with self.timings.part("build requests"):
            return self._build(job, result, seconds, data)

    def _build(self, job: ClientJob, result: TrainResult, seconds: float, data: ClientData | None) -> ClientResult:
        rt = self.runtime
        t0 = time.perf_counter()
        memory = ClientMemory(
            unpack_residuals(job.ef, rt.global_params),
            strategy_state=unpack_shaped(job.strategy_state, rt.global_params),
        )
        data = data if data is not None else self.data.subset(job.indices)  # what the release's noise key covers
        name = client_name(job.cid)
        request, payloads, kept = rt.build_update(name, job.round, job.model_version, result, memory, data)
        secure = rt.secure_input(name, job.round, job.model_version, payloads, data) if rt.config.secure else None
        return ClientResult(
            cid=job.cid,
            round=job.round,
            request=request.SerializeToString(deterministic=True),
            payload_bytes=sum(p.nbytes for p in payloads.values()),
            num_examples=result.num_examples,
            ef=pack_residuals(kept.residuals, rt.global_params) if kept.residuals else None,
            strategy_state=pack_residuals(kept.strategy_state, rt.global_params) if kept.strategy_state else None,
            train_loss=result.train_loss,
            seconds=seconds + time.perf_counter() - t0,
            secure_input=secure,
        )
