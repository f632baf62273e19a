"""Where clients' local training runs: a bounded pool of Ray actors (one per CPU by default), or
the driver itself (`simulation.actors: 0`, no Ray).

An actor holds the task's data and one model, never a client's state. A round's cohort is
cut into one chunk per actor (`split_cohort`, balanced by shard size); each call brings a
chunk of `ClientJob`s and the serialised global model (inline when small, else a reference
put in the object store once per version; decoded once per version in each actor), and returns the chunk's
`ClientResult`s with their request bytes already built. So a round costs one call per
actor, not one per client, and the actors train their chunks vectorised when the model
allows it. The pool size, not the number of clients, bounds memory and CPU.
"""

from __future__ import annotations

import resource
from typing import Any, Protocol

from gradcomp.errors import UserError
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.sim.client import ClientJob, ClientResult, SimClientRunner
from gradcomp.sim.timing import NO_TIMINGS, Timings

# Ray's default limit for inline call arguments: a model up to this size travels with each call.
INLINE_MODEL_BYTES = 100 * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ClientPool(Protocol):
    size: int

    @property
    def vectorized(self) -> bool:
        """Cohorts are trained with torch.func (sim/cohort.py), not one client at a time."""
        ...

    @property
    def fallback(self) -> str | None:
        """Why clients train one at a time (None when vectorized)."""
        ...

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        """Train every job on the model of `version`; results in job order."""
        ...

    def peak_rss(self) -> list[int]:
        """Peak RSS of each worker process (bytes)."""
        ...

    def close(self) -> None: ...


class LocalPool:
    """Clients trained one after another in the driver process."""

    def __init__(self, cfg: LocalTrainingConfig, secret: bytes, vectorize: str = "auto", timings: Timings = NO_TIMINGS):
        self.trainer = SimClientRunner(cfg, secret, vectorize, threads=1, timings=timings)
        self.size = 1

    @property
    def vectorized(self) -> bool:
        return self.trainer.vectorized

    @property
    def fallback(self) -> str | None:
        return self.trainer.fallback

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        return self.trainer.run_many(jobs, model)

    def peak_rss(self) -> list[int]:
        return []  # the driver's own peak covers it

    def close(self) -> None:
        return None


class _Runner:
    """The actor body (wrapped with ray.remote at pool creation, so importing this module needs no Ray)."""

    def __init__(self, cfg: LocalTrainingConfig, secret: bytes, vectorize: str = "auto"):
        self.trainer = SimClientRunner(cfg, secret, vectorize, threads=1)

    def run_many(self, jobs: list[ClientJob], model: bytes) -> list[ClientResult]:
        return self.trainer.run_many(jobs, model)

    def vectorized(self) -> bool:
        return self.trainer.vectorized

    def fallback(self) -> str | None:
        return self.trainer.fallback

    def peak_rss(self) -> int:
        return peak_rss_bytes()


def split_cohort(jobs: list[ClientJob], parts: int) -> list[list[int]]:
    """Positions of `jobs` per chunk: largest shards first, each to the chunk with the least work so far."""
    chunks: list[list[int]] = [[] for _ in range(min(parts, len(jobs)))]
    load = [0] * len(chunks)
    for pos in sorted(range(len(jobs)), key=lambda i: -jobs[i].indices.size):
        least = load.index(min(load))
        chunks[least].append(pos)
        load[least] += jobs[pos].indices.size
    return [sorted(c) for c in chunks]


class RayPool:
    """A fixed set of actors; every round sends each actor one chunk of the cohort."""

    def __init__(
        self,
        cfg: LocalTrainingConfig,
        secret: bytes,
        actors: int,
        vectorize: str = "auto",
        timings: Timings = NO_TIMINGS,
    ):
        """`timings` gets "actor busy": the busiest actor's seconds inside its call, per round."""
        import ray

        if actors < 1:
            raise UserError(f"a Ray pool needs at least one actor, got {actors}")
        remote = ray.remote(num_cpus=1)(_Runner)
        # Actor handles: their methods gain `.remote` at run time, which Ray's type hints cannot express.
        self.actors: list[Any] = [remote.remote(cfg, secret, vectorize) for _ in range(actors)]
        self.size = actors
        self.timings = timings
        self._model_ref: tuple[int, object] | None = None
        self.vectorized = bool(ray.get(self.actors[0].vectorized.remote()))
        self.fallback: str | None = ray.get(self.actors[0].fallback.remote())

    def _model(self, model: bytes, version: int) -> object:
        """The model as each call's argument: small ones inline (a put and a fetch per version cost
        ~1.5 ms, more than sending a few dozen kB with each call), large ones once per version
        through the object store (one copy per node, however many actors)."""
        import ray

        if len(model) <= INLINE_MODEL_BYTES:
            return model
        if self._model_ref is None or self._model_ref[0] != version:
            self._model_ref = (version, ray.put(model))
        return self._model_ref[1]

    def run(self, jobs: list[ClientJob], model: bytes, version: int) -> list[ClientResult]:
        import ray

        ref = self._model(model, version)
        chunks = split_cohort(jobs, self.size)
        calls = [a.run_many.remote([jobs[i] for i in c], ref) for a, c in zip(self.actors, chunks, strict=False)]
        out: list[ClientResult | None] = [None] * len(jobs)
        answers = ray.get(calls)
        for chunk, results in zip(chunks, answers, strict=True):
            for pos, res in zip(chunk, results, strict=True):
                out[pos] = res
        if self.timings.enabled:
            self.timings.add("actor busy", max(sum(r.seconds for r in results) for results in answers))
        return [r for r in out if r is not None]

    def peak_rss(self) -> list[int]:
        import ray

        return list(ray.get([a.peak_rss.remote() for a in self.actors]))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
