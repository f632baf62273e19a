"""Example-level DP in data-parallel training: per-example clipping against a loop reference,
noise placement, and the full loop in a real 2-process gloo group with epsilon per epoch."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradcomp.config.train import DPConfig, TrainJob
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.loop import Session, train_worker


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_per_example_clipping_matches_a_loop() -> None:
    model = _model()
    dp = ExampleDP(
        model, DPConfig(clip=0.5, noise_multiplier=0.0), rank=0, world=1, seed=0, split_noise=True, sample_rate=0.1
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 6, generator=g) * 3, torch.randint(0, 3, (7,), generator=g)
    got, loss = dp.gradient(x, y)
    total = torch.zeros_like(got)
    losses = []
    for i in range(7):
        model.zero_grad()
        out = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        out.backward()
        losses.append(float(out))
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        total += flat * min(1.0, 0.5 / float(flat.norm()))
    torch.testing.assert_close(got, total / 7, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(sum(losses) / 7, rel=1e-5)


def test_noise_std_split_only_for_linear_aggregation() -> None:
    cfg = DPConfig(clip=2.0, noise_multiplier=1.5)
    split = ExampleDP(_model(), cfg, rank=0, world=4, seed=0, split_noise=True, sample_rate=0.1)
    full = ExampleDP(_model(), cfg, rank=0, world=4, seed=0, split_noise=False, sample_rate=0.1)
    assert split.noise_std == pytest.approx(3.0 / 2) and full.noise_std == pytest.approx(3.0)
    # The noise is really there, at that scale (zero data gradient: all inputs are zero).
    model = nn.Linear(4000, 1, bias=False)
    nn.init.zeros_(model.weight)
    dp = ExampleDP(model, cfg, rank=0, world=4, seed=0, split_noise=True, sample_rate=0.1)
    grad, _ = dp.gradient(torch.zeros(1, 4000), torch.zeros(1, dtype=torch.long))
    assert float(grad.std()) == pytest.approx(1.5, rel=0.05)


SPECS = ["randomk(ratio=0.5, seed=1) | ef", "rtopk(ratio=0.1, r=0.2) | ef"]  # linear, then non-linear


def _worker(rank: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    out = {}
    for spec in SPECS:
        job = TrainJob.model_validate(
            {
                "name": "dp",
                "task": "digits-mlp",
                "epochs": 2,
                "batch_size": 64,
                "compression": spec,
                "optimizer": {"name": "momentum", "lr": 0.5, "momentum": 0.5},
                "checkpoint": {"every_epochs": 0},
                "dp": {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
            }
        )
        events: list[dict] = []
        session = Session(
            rank, 2, torch.device("cpu"), lambda m, d: None, progress=lambda e, sink=events: sink.extend(e["events"])
        )
        train_worker(job, session)
        out[spec] = [e for e in events if e["type"] == "epoch"]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dp_runs() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(f"file://{os.path.join(tmp, 'rdzv')}", tmp), nprocs=2, join=True)
        return json.loads(Path(tmp, "rank0.json").read_text())


@pytest.mark.parametrize("spec", SPECS)
def test_dp_training_reports_epsilon_per_epoch(dp_runs: dict, spec: str) -> None:
    epochs = dp_runs[spec]
    assert [e["epoch"] for e in epochs] == [1, 2]
    eps = [e["epsilon"] for e in epochs]
    assert 0 < eps[0] < eps[1] < math.inf
    assert all(e["delta"] == 1e-5 for e in epochs)
    assert epochs[-1]["test_accuracy"] > 0.2  # learning despite the noise (chance is 0.1)
