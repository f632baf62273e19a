"""Where clients' local training runs: a bounded pool of Ray actors (one per CPU by default), or
the driver itself (`simulation.actors: 0`, no Ray; handy for debugging and small tests).

An actor holds the task's data and one model, never a client's state: each call brings a
`ClientJob` and the serialised global model (put in the object store once per version) and
returns a `ClientResult`. The pool size, not the number of clients, bounds memory and CPU.
"""

from __future__ import annotations

import resource
from typing import Protocol

from gradcomp.sim.client import ClientJob, ClientResult, LocalConfig, LocalTrainer


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ClientPool(Protocol):
    size: int

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        """Train every job on the model of `version`; results in job order."""
        ...

    def peak_rss(self) -> list[int]:
        """Peak RSS of each worker process (bytes)."""
        ...

    def close(self) -> None: ...


class LocalPool:
    """Clients trained one after another in the driver process."""

    def __init__(self, cfg: LocalConfig):
        self.trainer = LocalTrainer(cfg, threads=1)
        self.size = 1

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        return [self.trainer.run(job, model) for job in jobs]

    def peak_rss(self) -> list[int]:
        return []  # the driver's own peak covers it

    def close(self) -> None:
        return None


class _Runner:
    """The actor body (wrapped with ray.remote at pool creation, so importing this module needs no Ray)."""

    def __init__(self, cfg: LocalConfig):
        self.trainer = LocalTrainer(cfg, threads=1)

    def run(self, job: ClientJob, model: bytes) -> ClientResult:
        return self.trainer.run(job, model)

    def peak_rss(self) -> int:
        return peak_rss_bytes()


class RayPool:
    """A fixed set of actors fed through `ray.util.ActorPool`: a client runs as soon as an actor is free."""

    def __init__(self, cfg: LocalConfig, actors: int):
        import ray
        from ray.util import ActorPool

        if actors < 1:
            raise ValueError(f"a Ray pool needs at least one actor, got {actors}")
        remote = ray.remote(num_cpus=1)(_Runner)
        self.actors = [remote.remote(cfg) for _ in range(actors)]
        self.pool = ActorPool(self.actors)
        self.size = actors
        self._model_ref: tuple[int, object] | None = None

    def _model(self, model: bytes, version: int) -> object:
        import ray

        if self._model_ref is None or self._model_ref[0] != version:
            self._model_ref = (version, ray.put(model))  # one copy per version in the object store
        return self._model_ref[1]

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        ref = self._model(model, version)
        for job in jobs:
            self.pool.submit(lambda actor, j: actor.run.remote(j, ref), job)
        out: list[ClientResult] = []
        while self.pool.has_next():
            out.append(self.pool.get_next_unordered())
        order = {j.cid: i for i, j in enumerate(jobs)}
        return sorted(out, key=lambda r: order[r.cid])

    def peak_rss(self) -> list[int]:
        import ray

        return list(ray.get([a.peak_rss.remote() for a in self.actors]))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
