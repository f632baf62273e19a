"""Selection stages: which positions a payload carries (topk, randomk, rtopk)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradcomp.compression.selection import random_subset, top_magnitude
from gradcomp.compression.stages.base import SHARE_MODES, Stage, StepContext, Work, dense_only, keep_count, register


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
        dense_only(self, work)
        if self.leader and ctx.choose is not None:
            idx = ctx.choose(self.kept(work.numel), lambda: self.select(work.values, ctx)).long()
        else:  # gather mode, or no collective (a lone rank leads itself)
            idx = self.select(work.values, ctx)
        return Work(work.values.index_select(0, idx), idx, work.numel, work.wire_dtype)


@register
@dataclass
class TopK(_Sparsifier):
    """Keep the k = ratio * n largest-magnitude values."""

    ratio: float
    share: str = "gather"
    name: ClassVar[str] = "topk"

    def select(self, values: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return top_magnitude(values, self.kept(values.numel()), ctx.generator)


@register
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
        dense_only(self, work)
        idx = self.indices(work.numel, ctx.key, ctx.step, work.values.device)
        return Work(work.values.index_select(0, idx), idx, work.numel, work.wire_dtype)


@register
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
