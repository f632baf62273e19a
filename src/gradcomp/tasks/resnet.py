"""A small CIFAR-style ResNet (He et al. 2016, 6n+2 layers: depth 8, 14, 20, ...).

GroupNorm by default: it keeps no running statistics, so DP-SGD's per-example gradients and the
vectorised cohort (torch.func over stacked parameters) can train it. `norm: batch` gives the usual
BatchNorm for plain data-parallel training without DP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradcomp.tasks.base import TaskError

NORMS = ("group", "batch")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(8, channels // 4) or 1, channels)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.n2 = _norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Three stages of (depth - 2) / 6 blocks at width, 2x width, 4x width; global pooling; linear head."""

    def __init__(
        self, depth: int = 8, width: int = 16, in_channels: int = 3, num_classes: int = 10, norm: str = "group"
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise TaskError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if norm not in NORMS:
            raise TaskError(f"resnet norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if width < 4 or width % 4:
            raise TaskError(f"resnet width must be a multiple of 4, got {width}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width), nn.ReLU()
        )
        layers, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and i == 0 else 1, norm))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(out.mean(dim=(2, 3)))
