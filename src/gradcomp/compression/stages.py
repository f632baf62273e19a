"""The compression stages. Each is a small dataclass with validated arguments and one
`apply` that maps a `Work` (flat values, optional indices) to the next `Work`.

Stage roles drive the build-time checks in pipeline.py: at most one `select`, `dp`
before any data-dependent selection, `ef` last.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gradcomp.compression.selection import random_subset, top_magnitude
from gradcomp.compression.spec import SpecError


@dataclass
class Work:
    """The tensor between stages: `values` (1-D, compute precision) at `indices` (None = all)."""

    values: torch.Tensor
    indices: torch.Tensor | None
    numel: int
    wire_dtype: torch.dtype


@dataclass
class StepContext:
    """Per-call facts a stage may use: which memory key, its step count, the pipeline's RNG."""

    key: str
    step: int
    generator: torch.Generator


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

    def to_spec(self) -> str:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        if not fields:
            return self.name
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields)
        return f"{self.name}({args})".replace("'", "")

    def _fail(self, arg: str, problem: str) -> None:
        raise SpecError(f"stage {self.name!r}: argument {arg!r} {problem}")

    def _ratio(self, arg: str) -> None:
        value = getattr(self, arg)
        if not 0 < value <= 1:
            self._fail(arg, f"must be in (0, 1], got {value}")


def _dense_only(stage: Stage, work: Work) -> None:
    if work.indices is not None:
        raise SpecError(f"stage {stage.name!r} needs a dense input; only one selection stage is allowed")


@dataclass
class NoneStage(Stage):
    name: ClassVar[str] = "none"
    role: ClassVar[str] = "identity"


@dataclass
class TopK(Stage):
    """Keep the k = ratio * n largest-magnitude values."""

    ratio: float
    name: ClassVar[str] = "topk"
    role: ClassVar[str] = "select"
    data_dependent: ClassVar[bool] = True

    def check(self) -> None:
        self._ratio("ratio")

    def kept(self, n: int) -> int:
        return keep_count(self.ratio, n)

    def apply(self, work: Work, ctx: StepContext) -> Work:
        _dense_only(self, work)
        idx = top_magnitude(work.values, self.kept(work.numel), ctx.generator)
        return Work(work.values.index_select(0, idx), idx, work.numel, work.wire_dtype)


@dataclass
class RandomK(Stage):
    """Keep k = ratio * n positions drawn from (seed, key, step): the same on every worker."""

    ratio: float
    seed: int = 0
    name: ClassVar[str] = "randomk"
    role: ClassVar[str] = "select"

    def check(self) -> None:
        self._ratio("ratio")

    def kept(self, n: int) -> int:
        return keep_count(self.ratio, n)

    def indices(self, n: int, key: str, step: int, device: torch.device) -> torch.Tensor:
        mixed = (self.seed * 1_000_003 + zlib.crc32(key.encode()) * 7919 + step) % (2**63)
        gen = torch.Generator(device=device).manual_seed(mixed)
        return random_subset(n, self.kept(n), gen, device)

    def apply(self, work: Work, ctx: StepContext) -> Work:
        _dense_only(self, work)
        idx = self.indices(work.numel, ctx.key, ctx.step, work.values.device)
        return Work(work.values.index_select(0, idx), idx, work.numel, work.wire_dtype)


@dataclass
class RTopK(Stage):
    """rTop-k: the r * n largest magnitudes, then k = ratio * n of those uniformly at random."""

    ratio: float
    r: float
    name: ClassVar[str] = "rtopk"
    role: ClassVar[str] = "select"
    data_dependent: ClassVar[bool] = True

    def check(self) -> None:
        self._ratio("ratio")
        self._ratio("r")
        if self.r < self.ratio:
            self._fail("r", f"({self.r}) must be >= ratio ({self.ratio}): k values are drawn from the top r")

    def kept(self, n: int) -> int:
        return keep_count(self.ratio, n)

    def apply(self, work: Work, ctx: StepContext) -> Work:
        _dense_only(self, work)
        n = work.numel
        k = self.kept(n)
        top = top_magnitude(work.values, max(k, keep_count(self.r, n)), ctx.generator)
        pick = random_subset(top.numel(), k, ctx.generator, top.device)
        idx = top.index_select(0, pick)
        return Work(work.values.index_select(0, idx), idx, n, work.wire_dtype)


@dataclass
class Unit(Stage):
    """SSGD: send the direction (unit L2 norm, times `scale`), hide the length."""

    scale: float = 1.0
    name: ClassVar[str] = "unit"
    role: ClassVar[str] = "transform"

    def check(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            self._fail("scale", f"must be a positive number, got {self.scale}")

    def apply(self, work: Work, ctx: StepContext) -> Work:
        norm = torch.linalg.vector_norm(work.values)
        factor = torch.where(norm > 0, self.scale / norm.clamp_min(1e-30), torch.zeros_like(norm))
        return dataclasses.replace(work, values=work.values * factor)


@dataclass
class DP(Stage):
    """Clip, then add noise of scale sigma * clip.

    Gaussian noise follows an L2 clip (std = sigma * clip). Laplace noise follows an L1
    clip (scale b = sigma * clip), since the Laplace mechanism's sensitivity is the L1 norm.
    """

    clip: float
    sigma: float
    mechanism: str = "gaussian"
    name: ClassVar[str] = "dp"
    role: ClassVar[str] = "privacy"

    def check(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            self._fail("clip", f"must be a positive number, got {self.clip}")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            self._fail("sigma", f"must be >= 0, got {self.sigma}")
        if self.mechanism not in ("gaussian", "laplace"):
            self._fail("mechanism", f"must be gaussian or laplace, got {self.mechanism!r}")

    @property
    def noise_scale(self) -> float:
        return self.sigma * self.clip

    def apply(self, work: Work, ctx: StepContext) -> Work:
        v = work.values
        order = 2 if self.mechanism == "gaussian" else 1
        norm = torch.linalg.vector_norm(v, ord=order)
        v = v * (self.clip / norm.clamp_min(self.clip))
        if self.sigma > 0 and v.numel():
            v = v + self.noise_scale * _noise(self.mechanism, v, ctx.generator)
        return dataclasses.replace(work, values=v)


def _noise(mechanism: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if mechanism == "gaussian":
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    u = torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


@dataclass
class Cast(Stage):
    """Send values in a narrower float type; EF (if any) keeps the rounding error."""

    name: ClassVar[str] = "cast"
    role: ClassVar[str] = "cast"
    target: ClassVar[torch.dtype] = torch.float16

    def apply(self, work: Work, ctx: StepContext) -> Work:
        return dataclasses.replace(work, wire_dtype=self.target)


@dataclass
class FP16(Cast):
    name: ClassVar[str] = "fp16"
    target: ClassVar[torch.dtype] = torch.float16


@dataclass
class BF16(Cast):
    name: ClassVar[str] = "bf16"
    target: ClassVar[torch.dtype] = torch.bfloat16


@dataclass
class ErrorFeedback(Stage):
    """Marker: the pipeline keeps the residual per key and adds it to the next input."""

    name: ClassVar[str] = "ef"
    role: ClassVar[str] = "feedback"


STAGES: dict[str, type[Stage]] = {
    cls.name: cls for cls in (NoneStage, TopK, RandomK, RTopK, Unit, DP, FP16, BF16, ErrorFeedback)
}

_TYPES = {float: float, int: int, str: str, "float": float, "int": int, "str": str}


def make_stage(name: str, args: list[Any], kwargs: dict[str, Any]) -> Stage:
    """Instantiate and validate one stage, with errors naming the stage and argument."""
    cls = STAGES.get(name)
    if cls is None:
        raise SpecError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    fields = [f for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    names = [f.name for f in fields]
    if len(args) > len(names):
        raise SpecError(
            f"stage {name!r} takes {len(names)} argument(s) ({', '.join(names) or 'none'}), got {len(args)} positional"
        )
    given = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names:
            takes = ", ".join(names) if names else "no arguments"
            raise SpecError(f"stage {name!r} has no argument {key!r}; it takes: {takes}")
        if key in given:
            raise SpecError(f"stage {name!r}: argument {key!r} given twice")
        given[key] = value
    for f in fields:
        if f.name not in given:
            if f.default is dataclasses.MISSING:
                raise SpecError(f"stage {name!r}: missing argument {f.name!r}")
            continue
        want = _TYPES[f.type]
        value = given[f.name]
        if want is str and not isinstance(value, str):
            raise SpecError(f"stage {name!r}: argument {f.name!r} must be text, got {value!r}")
        if want in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SpecError(f"stage {name!r}: argument {f.name!r} must be a number, got {value!r}")
            if want is int and float(value) != int(value):
                raise SpecError(f"stage {name!r}: argument {f.name!r} must be an integer, got {value!r}")
            given[f.name] = want(value)
    stage = cls(**given)
    stage.check()
    return stage
