"""The privacy stage: clip the update, then add Gaussian or Laplace noise."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradcomp.compression.stages.base import Stage, StepContext, Work, register


@register
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
