"""What the pfl-research and Flower runners share: the task's data and model, timing, the JSON line.

These scripts run in their own virtual environments (runs/bench/venv-*), so they import
neither gradcomp nor each other's framework. The data, partition included, comes from the
gradcomp driver as one .npz file, so every simulator trains on identical shards.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help=".npz written by benchmarks/fl_anchors.py")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(x_train, y_train, x_test, y_test, shards): shards are index arrays into the train set."""
    d = np.load(path)
    offsets = d["offsets"]
    shards = [d["indices"][offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return d["x_train"], d["y_train"], d["x_test"], d["y_test"], shards


def mlp(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(dim=1)
    return float((pred == torch.from_numpy(y)).float().mean())


class RoundClock:
    """Timestamps at the end of every round; steady throughput leaves the first round out."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ends: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def report(self, per_round: int, accuracy: float | None, **extra: object) -> None:
        steady = self.ends[-1] - self.ends[0] if len(self.ends) > 1 else float("nan")
        updates = per_round * (len(self.ends) - 1)
        out = {
            "rounds": len(self.ends),
            "steady_updates": updates,
            "steady_seconds": round(steady, 4),
            "updates_per_second": round(updates / steady, 2) if steady > 0 else None,
            "accuracy": accuracy,
            **extra,
        }
        print("RESULT " + json.dumps(out), flush=True)
