"""Value transforms that keep every position: unit direction (SSGD) and narrower float casts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradcomp.compression.stages.base import Stage, StepContext, Work, register


@register
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
class Cast(Stage):
    """Send values in a narrower float type; EF (if any) keeps the rounding error."""

    name: ClassVar[str] = "cast"
    role: ClassVar[str] = "cast"
    target: ClassVar[torch.dtype] = torch.float16

    def apply(self, work: Work, ctx: StepContext) -> Work:
        return dataclasses.replace(work, wire_dtype=self.target)


@register
@dataclass
class FP16(Cast):
    name: ClassVar[str] = "fp16"
    target: ClassVar[torch.dtype] = torch.float16


@register
@dataclass
class BF16(Cast):
    name: ClassVar[str] = "bf16"
    target: ClassVar[torch.dtype] = torch.bfloat16
