"""scikit-learn's shipped 8x8 digits (1797 images), with a fixed stratified train/test split."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradcomp.tasks.base import Task

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def _cache_file() -> Path:
    """Where the split is kept, per scikit-learn version (its data or split could change with it)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradcomp"
    return root / f"digits-sklearn{version('scikit-learn')}-seed{SPLIT_SEED}-test{TEST_FRACTION}.npz"


def _split() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype("float32") / 16.0
    y = digits.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te}


@lru_cache(maxsize=1)
def _arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split, from a cache file after the first time: importing scikit-learn costs ~150 MB of
    memory in every process that loads the task (each simulation actor, each worker)."""
    path = _cache_file()
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("x_tr", "y_tr", "x_te", "y_te")}
    except (OSError, KeyError, ValueError):
        arrays = _split()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, x_tr=arrays["x_tr"], y_tr=arrays["y_tr"], x_te=arrays["x_te"], y_te=arrays["y_te"])
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: load from scikit-learn every time
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(arrays[k]) for k in ("x_tr", "y_tr", "x_te", "y_te"))
    return x_tr, y_tr, x_te, y_te


def _datasets(image: bool) -> tuple[TensorDataset, TensorDataset]:
    x_tr, y_tr, x_te, y_te = _arrays()
    if image:
        x_tr, x_te = x_tr.view(-1, 1, 8, 8), x_te.view(-1, 1, 8, 8)
    return TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)


class DigitsMLP(nn.Sequential):
    def __init__(self, hidden: int = 128):
        super().__init__(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_mlp(hidden: int = 128) -> Task:
    train, test = _datasets(image=False)
    return Task("digits-mlp", lambda: DigitsMLP(hidden), train, test, num_classes=10)


def digits_cnn(channels: int = 32) -> Task:
    train, test = _datasets(image=True)
    return Task("digits-cnn", lambda: DigitsCNN(channels), train, test, num_classes=10)
