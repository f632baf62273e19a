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

from gradcomp.compression import build
from gradcomp.protocol.codec import deserialize_model
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


class LocalTrainer:
    """Runs clients' local training for one job; reused across thousands of clients."""

    def __init__(self, cfg: LocalConfig, threads: int = 1):
        from gradcomp.tasks import load_task

        torch.set_num_threads(threads)
        self.cfg = cfg
        task = load_task(cfg.task, **cfg.task_args)
        self.x, self.y = _tensors(task.train_set)
        self.model: nn.Module = task.make_model()
        self.names = [k for k, v in self.model.state_dict().items() if v.is_floating_point()]
        self._version: int | None = None
        self._global: dict[str, torch.Tensor] = {}

    def _load_global(self, version: int, model: bytes) -> None:
        """Decode the global model (a serialised `ModelWeights`) once per version per actor."""
        if version != self._version:
            got, params = deserialize_model(model)
            if got != version:
                raise ValueError(f"model bytes hold version {got}, the job asked for {version}")
            self._global, self._version = params, version

    def run(self, job: ClientJob, model: bytes) -> ClientResult:
        t0 = time.perf_counter()
        self._load_global(job.model_version, model)
        cfg = self.cfg
        model = self.model
        model.load_state_dict(self._global, strict=False)
        model.train()
        gen = torch.Generator().manual_seed(job.seed)
        idx = torch.from_numpy(job.indices.astype(np.int64))
        x, y = self.x[idx], self.y[idx]
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        loss_sum, batches = 0.0, 0
        for _ in range(cfg.epochs):
            order = torch.randperm(idx.numel(), generator=gen)
            for start in range(0, idx.numel(), cfg.batch_size):
                b = order[start : start + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x[b]), y[b])
                loss.backward()
                opt.step()
                loss_sum += loss.item()
                batches += 1
        local = model.state_dict()
        pipe = build(cfg.spec, seed=job.seed)
        if pipe.ef:
            # randomk positions follow (seed, key, step): step = round, so all clients of a round agree.
            state = {"steps": dict.fromkeys(self.names, job.round), "memory": _unflatten(job.ef, self._global)}
            pipe.load_state_dict(state)
        else:
            pipe.load_state_dict({"steps": dict.fromkeys(self.names, job.round)})
        payloads = {k: pipe.compress((local[k] - self._global[k]).float(), key=k) for k in self.names}
        ef = _flatten(pipe, self.names, self._global) if pipe.ef else None
        request = update_request(
            client_id=f"sim-{job.cid}",
            round=job.round,
            model_version=job.model_version,
            num_examples=int(idx.numel()),
            payloads=payloads,
            metrics={"train_loss": loss_sum / max(batches, 1), "train_seconds": time.perf_counter() - t0},
        )
        return ClientResult(
            cid=job.cid,
            round=job.round,
            request=request,
            payload_bytes=sum(p.nbytes for p in payloads.values()),
            num_examples=int(idx.numel()),
            ef=ef,
            train_loss=loss_sum / max(batches, 1),
            seconds=time.perf_counter() - t0,
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
