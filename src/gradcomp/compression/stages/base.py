"""What every stage shares: `Work` (the tensor between stages), `StepContext`, the `Stage` base
class and the registry a stage joins with `@register`.

Each stage is a small dataclass with validated arguments and one `apply` that maps a `Work`
(flat values, optional indices) to the next `Work`. Stage roles drive the build-time checks in
pipeline.py: at most one `select`, `dp` before any data-dependent selection, `ef` last.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from gradcomp.compression.payload import Payload
from gradcomp.compression.spec import SpecError
from gradcomp.keyed_random import KeyedStream

# Builds a stage's own payload kind for the restored tensor's (shape, dtype).
PayloadMaker = Callable[[tuple[int, ...], torch.dtype], Payload]


@dataclass
class Work:
    """The tensor between stages: `values` (1-D, compute precision) at `indices` (None = all).

    A stage that sends its own payload kind (qsgd: integer levels and norm scales) sets `encoded`
    to build it, and leaves in `values` what the receiver will restore, so error feedback keeps
    exactly the rest. Only error feedback may follow such a stage (`check_pipeline`)."""

    values: torch.Tensor
    indices: torch.Tensor | None
    numel: int
    wire_dtype: torch.dtype
    encoded: PayloadMaker | None = None


# Leader mode: given k and a thunk computing this rank's own selection, return the positions
# every rank uses this step (the leader computes and broadcasts them; the others receive).
Chooser = Callable[[int, Callable[[], torch.Tensor]], torch.Tensor]
SHARE_MODES = ("gather", "leader")


@dataclass
class StepContext:
    """Per-call facts a stage may use: which memory key, its step count, the pipeline's RNG,
    (leader mode, inside a collective) how positions are agreed on, and the secret stream the
    dp stage draws its noise from when the pipeline has one (else it uses `generator`)."""

    key: str
    step: int
    generator: torch.Generator
    choose: Chooser | None = None
    noise: KeyedStream | None = None


def keep_count(ratio: float, n: int) -> int:
    """Number of values a ratio keeps out of n: at least one of a non-empty tensor."""
    return 0 if n == 0 else min(n, max(1, round(ratio * n)))


class Stage:
    name: ClassVar[str]
    role: ClassVar[str]  # identity | select | transform | privacy | cast | feedback
    data_dependent: ClassVar[bool] = False

    def check(self) -> None:
        """Validate arguments; raise SpecError naming the stage and argument."""

    def apply(self, work: Work, ctx: StepContext) -> Work:
        return work

    def kept(self, n: int) -> int:
        """How many of n values survive this stage."""
        return n

    def check_pipeline(self, stages: list[Stage]) -> None:
        """Refuse (SpecError) a pipeline this stage cannot work in; `stages` includes this one."""

    def to_spec(self) -> str:
        # every stage is a dataclass (registered with @register_stage); the Stage base cannot say so
        fields = [f for f in dataclasses.fields(self) if not self._is_quiet(f)]  # type: ignore[arg-type]
        if not fields:
            return self.name
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields)
        return f"{self.name}({args})".replace("'", "")

    def _is_quiet(self, f: dataclasses.Field[Any]) -> bool:
        """Arguments added after specs were in use are left out of `to_spec` at their default,
        so existing specs (and the runs keyed by them) keep their normalised text."""
        return f.name in self.quiet and getattr(self, f.name) == f.default

    quiet: ClassVar[tuple[str, ...]] = ()

    def _fail(self, arg: str, problem: str) -> None:
        raise SpecError(f"stage {self.name!r}: argument {arg!r} {problem}")

    def _ratio(self, arg: str) -> None:
        value = getattr(self, arg)
        if not 0 < value <= 1:
            self._fail(arg, f"must be in (0, 1], got {value}")


def dense_only(stage: Stage, work: Work) -> None:
    if work.indices is not None:
        raise SpecError(f"stage {stage.name!r} needs a dense input; only one selection stage is allowed")


STAGES: dict[str, type[Stage]] = {}
S = TypeVar("S", bound=type[Stage])


def register(cls: S) -> S:
    """Class decorator: make a stage usable by its `name` in specs. Every module of this package
    is imported by its `__init__`, so a stage registers itself by existing."""
    if cls.name in STAGES and STAGES[cls.name] is not cls:
        raise TypeError(f"two stages named {cls.name!r}: {STAGES[cls.name].__name__} and {cls.__name__}")
    STAGES[cls.name] = cls
    return cls
