"""The compression stages. Each is a small dataclass with validated arguments and one
`apply` that maps a `Work` (flat values, optional indices) to the next `Work`.

Stage roles drive the build-time checks in pipeline.py: at most one `select`, `dp`
before any data-dependent selection, `ef` last.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gradcomp.compression.selection import random_subset, top_magnitude
from gradcomp.compression.spec import SpecError
from gradcomp.keyed_random import KeyedStream


@dataclass
class Work:
    """The tensor between stages: `values` (1-D, compute precision) at `indices` (None = all)."""

    values: torch.Tensor
    indices: torch.Tensor | None
    numel: int
    wire_dtype: torch.dtype


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

    def to_spec(self) -> str:
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


def _dense_only(stage: Stage, work: Work) -> None:
    if work.indices is not None:
        raise SpecError(f"stage {stage.name!r} needs a dense input; only one selection stage is allowed")


@dataclass
class NoneStage(Stage):
    name: ClassVar[str] = "none"
    role: ClassVar[str] = "identity"


class _Sparsifier(Stage):
    """A data-dependent selection with two ways to share it (`share`):

    - `gather` (default, as in the rTop-k paper): every rank keeps its own positions, and
      the collective gathers every rank's (position, value) pairs;
    - `leader`: one rank per step (rotating) selects on its error-compensated input and its
      positions are used by all (cyclic local top-k, ScaleCom), so values can be all-reduced.
    """

    ratio: float
    share: str
    role: ClassVar[str] = "select"
    data_dependent: ClassVar[bool] = True
    quiet: ClassVar[tuple[str, ...]] = ("share",)

    def check(self) -> None:
        self._ratio("ratio")
        if self.share not in SHARE_MODES:
            self._fail("share", f"must be one of {', '.join(SHARE_MODES)}, got {self.share!r}")

    def kept(self, n: int) -> int:
        return keep_count(self.ratio, n)

    @property
    def leader(self) -> bool:
        return self.share == "leader"

    def select(self, values: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """This rank's own choice of positions (int64) in `values`."""
        raise NotImplementedError

    def apply(self, work: Work, ctx: StepContext) -> Work:
        _dense_only(self, work)
        if self.leader and ctx.choose is not None:
            idx = ctx.choose(self.kept(work.numel), lambda: self.select(work.values, ctx)).long()
        else:  # gather mode, or no collective (a lone rank leads itself)
            idx = self.select(work.values, ctx)
        return Work(work.values.index_select(0, idx), idx, work.numel, work.wire_dtype)


@dataclass
class TopK(_Sparsifier):
    """Keep the k = ratio * n largest-magnitude values."""

    ratio: float
    share: str = "gather"
    name: ClassVar[str] = "topk"

    def select(self, values: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return top_magnitude(values, self.kept(values.numel()), ctx.generator)


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
class RTopK(_Sparsifier):
    """rTop-k: the r * n largest magnitudes, then k = ratio * n of those uniformly at random."""

    ratio: float
    r: float
    share: str = "gather"
    name: ClassVar[str] = "rtopk"

    def check(self) -> None:
        super().check()
        self._ratio("r")
        if self.r < self.ratio:
            self._fail("r", f"({self.r}) must be >= ratio ({self.ratio}): k values are drawn from the top r")

    def select(self, values: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        n = values.numel()
        k = self.kept(n)
        top = top_magnitude(values, max(k, keep_count(self.r, n)), ctx.generator)
        pick = random_subset(top.numel(), k, ctx.generator, top.device)
        return top.index_select(0, pick)


@dataclass
class Unit(Stage):
    """SSGD: send the direction (unit L2 norm, times `scale`) instead of the gradient.

    It removes the gradient's length and nothing else: inversion attacks that match by cosine
    or by ratios of entries reconstruct inputs from it as well as from the raw gradient
    (`gradcomp audit`). It is a compression/robustness choice, not a privacy mechanism.
    """

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
            unit = (
                ctx.noise.noise(self.mechanism, v)
                if ctx.noise is not None
                else _noise(self.mechanism, v, ctx.generator)
            )
            v = v + self.noise_scale * unit
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
class PowerSGD(Stage):
    """Marker for torch's PowerSGD DDP hook (rank-r factors P and Q, each all-reduced).

    Not a per-tensor stage: the worker hands whole DDP buckets to torch's own
    `powerSGD_hook` and `PowerSGDState`, which keep their error feedback, warm start and
    dense first `start_iter` steps. Arguments map one to one onto `PowerSGDState`:
    rank -> matrix_approximation_rank, start_iter -> start_powerSGD_iter,
    min_rate -> min_compression_rate, error_feedback -> use_error_feedback,
    warm_start -> warm_start, seed -> random_seed.
    """

    rank: int = 1
    start_iter: int = 2
    min_rate: float = 2.0
    error_feedback: bool = True
    warm_start: bool = True
    seed: int = 0
    name: ClassVar[str] = "powersgd"
    role: ClassVar[str] = "lowrank"

    def check(self) -> None:
        if self.rank < 1:
            self._fail("rank", f"must be >= 1, got {self.rank}")
        if self.min_rate <= 0 or not math.isfinite(self.min_rate):
            self._fail("min_rate", f"must be a positive number, got {self.min_rate}")
        if self.start_iter < 0:
            self._fail("start_iter", f"must be >= 0, got {self.start_iter}")
        if (self.error_feedback or self.warm_start) and self.start_iter < 2:
            self._fail(
                "start_iter",
                f"must be >= 2 with error_feedback or warm_start (torch's PowerSGD runs them only after "
                f"DDP's first two iterations), got {self.start_iter}",
            )

    def apply(self, work: Work, ctx: StepContext) -> Work:
        raise SpecError("'powersgd' compresses whole DDP buckets through torch's hook; it has no per-tensor form")


@dataclass
class ErrorFeedback(Stage):
    """Marker: the pipeline keeps the residual per key and adds it to the next input."""

    name: ClassVar[str] = "ef"
    role: ClassVar[str] = "feedback"


STAGES: dict[str, type[Stage]] = {
    cls.name: cls for cls in (NoneStage, TopK, RandomK, RTopK, Unit, DP, FP16, BF16, PowerSGD, ErrorFeedback)
}

_TYPES = {float: float, int: int, str: str, bool: bool, "float": float, "int": int, "str": str, "bool": bool}
_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def _coerce(stage: str, arg: str, want: type, value: Any) -> Any:
    """A spec value as the argument's type, or a SpecError naming stage and argument."""
    if want is bool:
        value = _BOOL_WORDS.get(value.lower(), value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise SpecError(f"stage {stage!r}: argument {arg!r} must be true or false, got {value!r}")
        return value
    if want is str:
        if not isinstance(value, str):
            raise SpecError(f"stage {stage!r}: argument {arg!r} must be text, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"stage {stage!r}: argument {arg!r} must be a number, got {value!r}")
    if want is int and float(value) != int(value):
        raise SpecError(f"stage {stage!r}: argument {arg!r} must be an integer, got {value!r}")
    return want(value)


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
        given[f.name] = _coerce(name, f.name, _TYPES[f.type], given[f.name])
    stage = cls(**given)
    stage.check()
    return stage
