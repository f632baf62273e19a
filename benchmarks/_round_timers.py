"""Where a simulated round's time goes: wall time of the simulation's parts, per round.

Used by `fl_anchors.py --parts breakdown`. The parts are wrapped in place on one `Simulation`
(instrumentation only: nothing in gradcomp calls this), and the wrappers cost ~1 us a call.

  pool call         the whole training call (in the driver, or Ray round trips to the actors)
  steps             the cohort's recorded SGD steps: gradients, in-place update, loss sum
                    (vectorised, in the driver only)
  schedules         building the padded batch schedules (the clients' epoch shuffles)
  build requests    update = local - global, compression, protobuf request (per client)
  accept updates    parse the request bytes, validate, decode and clip (the coordinator, per client)
  close round       the coordinator's finish_round checks and the aggregation
  actor busy        with actors: the busiest actor's training + request building, inside the actor
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any


class Timers:
    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def timed(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return call

    def wrap(self, owner: Any, name: str, label: str) -> None:
        setattr(owner, name, self.timed(label, getattr(owner, name)))


def instrument(sim: Any) -> Timers:
    """Wrap the parts of `sim` (a gradcomp.sim.engine.Simulation) listed in the module docstring."""
    from gradcomp.sim import cohort
    from gradcomp.sim.pool import split_cohort

    timers = Timers()
    pool_run = sim.pool.run

    def run(jobs: list, model: bytes, version: int) -> list:
        results = pool_run(jobs, model, version)
        if hasattr(sim.pool, "actors"):  # a Ray pool: the actors report their own time
            chunks = split_cohort(jobs, sim.pool.size)
            timers.seconds["actor busy"] += max(sum(results[i].seconds for i in c) for c in chunks)
        return results

    sim.pool.run = timers.timed("pool call", run)
    timers.wrap(sim, "_submit", "accept updates")
    timers.wrap(sim.coord, "finish_round", "close round")
    trainer = getattr(sim.pool, "trainer", None)
    if trainer is not None:
        timers.wrap(trainer, "_finish", "build requests")
        if trainer.cohort is not None:
            cache = trainer.cohort.step
            replay = cache.replay
            cache.replay = lambda *a: timers.timed("steps", replay(*a))
            timers.wrap(cohort, "_schedule", "schedules")
    return timers


def per_round(timers: Timers, rounds: int) -> dict[str, Any]:
    """Milliseconds per round for each part, and the step count and cost when steps were timed."""
    out: dict[str, Any] = {label: round(s / rounds * 1e3, 3) for label, s in timers.seconds.items()}
    if timers.calls["steps"]:
        out["steps per round"] = round(timers.calls["steps"] / rounds, 2)
        out["us per step"] = round(timers.seconds["steps"] / timers.calls["steps"] * 1e6, 1)
    return out
