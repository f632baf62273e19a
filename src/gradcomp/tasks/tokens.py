"""Next-token examples as index views into one token tensor.

An example is a window of `block_size + 1` tokens at a start offset: the input is its first
`block_size` tokens, the target the same shifted by one. The dataset keeps only the shared tensor
and the start offsets, so a client's shard (a subset of starts) costs 8 bytes per example, not
a copy of its text.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TokenWindows(Dataset):
    """Windows of one uint8 (or int) token tensor; `groups` names each window's natural client."""

    def __init__(self, data: torch.Tensor, starts: torch.Tensor, block_size: int, groups: torch.Tensor | None = None):
        if data.dim() != 1:
            raise ValueError("token data must be one flat tensor")
        if starts.numel() and int(starts.max()) + block_size + 1 > data.numel():
            raise ValueError("a window runs past the end of the token data")
        self.data = data
        self.starts = starts.to(torch.int64)
        self.block_size = int(block_size)
        self.groups = groups
        self._offsets = torch.arange(self.block_size + 1)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.window_tokens(self.starts[int(i)].reshape(1))[0]
        return window[:-1], window[1:]

    def window_tokens(self, starts: torch.Tensor) -> torch.Tensor:
        """[n, block_size + 1] int64 tokens of the windows at `starts` (one gather, no per-item loop)."""
        return self.data[starts.to(torch.int64)[:, None] + self._offsets].long()

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the examples at `indices`, each [n, block_size] int64."""
        windows = self.window_tokens(self.starts[torch.as_tensor(indices, dtype=torch.int64)])
        return windows[:, :-1], windows[:, 1:]

    def subset(self, indices: torch.Tensor) -> TokenWindows:
        """A view of the examples at `indices`: same token tensor, selected starts."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        groups = self.groups[idx] if self.groups is not None else None
        return TokenWindows(self.data, self.starts[idx], self.block_size, groups)
