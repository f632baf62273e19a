"""Where a simulated round's wall time goes: a public hook the simulation's parts report into.

Pass a `Timings` to `build_simulation(..., timings=)` (or to `Simulation`, `LocalPool`, `RayPool`,
`SimClientRunner`, `CohortTrainer`) and each part adds its seconds and call count under its label:

  pool call         the whole training call (in the driver, or Ray round trips to the actors)
  steps             the cohort's recorded SGD steps (vectorised, in the driver only)
  schedules         building the padded batch schedules (the clients' epoch shuffles)
  build requests    update = local - global, compression, protobuf request (per client)
  accept updates    parse the request bytes, validate, decode and clip (the coordinator, per client)
  close round       the coordinator's finish_round checks and the aggregation
  actor busy        with actors: the busiest actor's training + request building, inside the actor

Benchmarks read it instead of wrapping private methods, so a rename cannot silently stop a part
being measured. Unset, the parts get `NO_TIMINGS`, whose context is one shared no-op and whose
`wrap` returns the function itself, so the per-step loop pays nothing.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

PARTS = ("pool call", "steps", "schedules", "build requests", "accept updates", "close round", "actor busy")

F = TypeVar("F", bound=Callable[..., Any])


class Timings:
    """Seconds and calls per part label (see the module docstring)."""

    enabled = True

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    @contextmanager
    def _timed(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(label, time.perf_counter() - t0)

    def part(self, label: str) -> AbstractContextManager[None]:
        """`with timings.part("accept updates"): ...` adds the block's wall time under `label`."""
        return self._timed(label)

    def wrap(self, label: str, fn: F) -> F:
        """`fn`, timed under `label` on every call (for hot loops: decide once, not per call)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self._timed(label):
                return fn(*args, **kwargs)

        return timed  # type: ignore[return-value]  # same call signature as fn, which a TypeVar cannot say

    def add(self, label: str, seconds: float, calls: int = 1) -> None:
        self.seconds[label] += seconds
        self.calls[label] += calls

    def reset(self) -> None:
        """Forget what was measured (e.g. after a warm-up round)."""
        self.seconds.clear()
        self.calls.clear()


class _NoTimings(Timings):
    """The default: measures nothing and costs (almost) nothing."""

    enabled = False
    _null: AbstractContextManager[None] = nullcontext()

    def part(self, label: str) -> AbstractContextManager[None]:
        return self._null

    def wrap(self, label: str, fn: F) -> F:
        return fn

    def add(self, label: str, seconds: float, calls: int = 1) -> None:
        return None


NO_TIMINGS: Timings = _NoTimings()
