"""One virtual client's round: local training on its shard, update = local - global, compression
with its own error-feedback memory, and the protobuf `SubmitUpdateRequest` a real client sends.

`LocalTrainer` lives inside a Ray actor (or the driver when simulation.actors is 0). It
loads the task once and keeps one model object; everything client-specific arrives with
the call (`ClientJob`) and leaves with the result, so the actor is stateless between clients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcomp.compression.pipeline import Pipeline, parse_spec
from gradcomp.protocol.codec import deserialize_model
from gradcomp.sim.cohort import CohortClient, CohortTrainer, why_not_vectorizable
from gradcomp.sim.local_sgd import SGDConfig, train_one
from gradcomp.sim.wire import update_request


@dataclass
class ClientJob:
    cid: int
    round: int
    model_version: int
    indices: np.ndarray
    seed: int
    ef: np.ndarray | None = None


@dataclass
class ClientResult:
    cid: int
    round: int
    request: bytes  # serialised SubmitUpdateRequest, exactly what goes on the wire
    payload_bytes: int  # sum of the update's encoded payload sizes (compression wire format)
    num_examples: int
    ef: np.ndarray | None
    train_loss: float
    seconds: float


@dataclass(frozen=True)
class LocalConfig:
    task: str
    task_args: dict[str, Any]
    spec: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    vectorize: str = "auto"  # auto | on | off: train a cohort with torch.func (sim/cohort.py)


class LocalTrainer:
    """Runs clients' local training for one job; reused across thousands of clients.

    `run_many` trains a cohort vectorised (sim/cohort.py) when the job allows it
    (`LocalConfig.vectorize`: auto | on | off) and one client after another otherwise;
    `vectorized` says which, `fallback` why not.
    """

    def __init__(self, cfg: LocalConfig, threads: int = 1):
        from gradcomp.tasks import load_task

        torch.set_num_threads(threads)
        self.cfg = cfg
        task = load_task(cfg.task, **cfg.task_args)
        self.x, self.y = _tensors(task.train_set)
        self.model: nn.Module = task.make_model()
        self.names = [k for k, v in self.model.state_dict().items() if v.is_floating_point()]
        self.sgd = SGDConfig(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum)
        self.stages = parse_spec(cfg.spec)  # parsed once; a Pipeline per client holds its state
        self._version: int | None = None
        self._global: dict[str, torch.Tensor] = {}
        self.fallback = why_not_vectorizable(self.model) if cfg.vectorize != "off" else "simulation.vectorize is off"
        if cfg.vectorize == "on" and self.fallback is not None:
            raise ValueError(f"simulation.vectorize is on, but {self.fallback}")
        self.cohort = CohortTrainer(self.model, self.x, self.y, self.sgd) if self.fallback is None else None

    @property
    def vectorized(self) -> bool:
        return self.cohort is not None

    def _load_global(self, version: int, model: bytes) -> None:
        """Decode the global model (a serialised `ModelWeights`) once per version per actor."""
        if version != self._version:
            got, params = deserialize_model(model)
            if got != version:
                raise ValueError(f"model bytes hold version {got}, the job asked for {version}")
            self._global, self._version = params, version

    def run(self, job: ClientJob, model: bytes) -> ClientResult:
        """Train one client on its own (the sequential path)."""
        t0 = time.perf_counter()
        self._load_global(job.model_version, model)
        self.model.load_state_dict(self._global, strict=False)
        idx = torch.from_numpy(job.indices.astype(np.int64))
        local, loss, _ = train_one(self.model, self.x[idx], self.y[idx], self.sgd, job.seed)
        return self._finish(job, local, loss, time.perf_counter() - t0)

    def run_many(self, jobs: list[ClientJob], model: bytes) -> list[ClientResult]:
        """Train a cohort (all on the same model version); results in job order."""
        if self.cohort is None or not jobs:
            return [self.run(job, model) for job in jobs]
        t0 = time.perf_counter()
        versions = {job.model_version for job in jobs}
        if len(versions) != 1:
            raise ValueError(f"a cohort trains on one model version, got {sorted(versions)}")
        self._load_global(versions.pop(), model)
        start = {k: v for k, v in self.model.state_dict().items() if k not in self._global} | self._global
        trained = self.cohort.train(start, [CohortClient(job.indices, job.seed) for job in jobs])
        share = (time.perf_counter() - t0) / len(jobs)
        return [self._finish(job, t.params, t.train_loss, share) for job, t in zip(jobs, trained, strict=True)]

    def _finish(self, job: ClientJob, local: dict[str, torch.Tensor], loss: float, seconds: float) -> ClientResult:
        """Update = local - global, compressed with the client's error feedback, as request bytes."""
        t0 = time.perf_counter()
        pipe = Pipeline(self.stages, seed=job.seed)
        steps = dict.fromkeys(self.names, job.round)
        # randomk positions follow (seed, key, step): step = round, so all clients of a round agree.
        pipe.load_state_dict(
            {"steps": steps, "memory": _unflatten(job.ef, self._global)} if pipe.ef else {"steps": steps}
        )
        payloads = {
            k: pipe.compress(
                (local[k] - self._global[k]).float() if k in local else torch.zeros_like(self._global[k]), key=k
            )
            for k in self.names
        }
        seconds += time.perf_counter() - t0
        request = update_request(
            client_id=f"sim-{job.cid}",
            round=job.round,
            model_version=job.model_version,
            num_examples=int(job.indices.size),
            payloads=payloads,
            metrics={"train_loss": loss, "train_seconds": seconds},
        )
        return ClientResult(
            cid=job.cid,
            round=job.round,
            request=request,
            payload_bytes=sum(p.nbytes for p in payloads.values()),
            num_examples=int(job.indices.size),
            ef=_flatten(pipe, self.names, self._global) if pipe.ef else None,
            train_loss=loss,
            seconds=seconds,
        )


def _tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack([torch.as_tensor(v) for v in xs]), torch.as_tensor([int(v) for v in ys])


def _flatten(pipe: Any, names: list[str], like: dict[str, torch.Tensor]) -> np.ndarray:
    """The pipeline's residuals as one float32 vector in model order (zeros where none yet)."""
    parts = []
    for k in names:
        r = pipe.residual(k)
        n = like[k].numel()
        if r is None or r.numel() != n:  # no residual, or one over a dp-chosen subset: start afresh
            parts.append(np.zeros(n, dtype=np.float32))
        else:
            parts.append(r.detach().reshape(-1).to(torch.float32).numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _unflatten(flat: np.ndarray | None, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if flat is None:
        return {}
    out, at = {}, 0
    for k, t in like.items():
        n = t.numel()
        out[k] = torch.from_numpy(flat[at : at + n].copy())
        at += n
    return out
