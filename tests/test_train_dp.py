"""Example-level DP in data-parallel training: per-example clipping against a loop reference,
noise placement, and the full loop in a real 2-process gloo group with epsilon per epoch."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from gradcomp.config.train import DPConfig, TrainJob
from gradcomp.privacy import gaussian_epsilon
from gradcomp.tasks import load_task
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.local_group import spawn_gloo_ranks
from gradcomp.worker.loop import Session, train_worker
from gradcomp.worker.sampling import PoissonPlan


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_per_example_clipping_matches_a_loop() -> None:
    model = _model()
    cfg = DPConfig(clip=0.5, noise_multiplier=0.0)
    dp = ExampleDP(model, cfg, rank=0, world=1, seed=0, split_noise=True, sample_rate=0.1, expected_batch=7.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 6, generator=g) * 3, torch.randint(0, 3, (7,), generator=g)
    got, loss_sum = dp.gradient(x, y)
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
    assert loss_sum == pytest.approx(sum(losses), rel=1e-5)


def test_noise_std_split_only_for_linear_aggregation() -> None:
    cfg = DPConfig(clip=2.0, noise_multiplier=1.5)
    split = ExampleDP(_model(), cfg, rank=0, world=4, seed=0, split_noise=True, sample_rate=0.1, expected_batch=1.0)
    full = ExampleDP(_model(), cfg, rank=0, world=4, seed=0, split_noise=False, sample_rate=0.1, expected_batch=1.0)
    assert split.noise_std == pytest.approx(3.0 / 2) and full.noise_std == pytest.approx(3.0)
    # The noise is really there, at that scale (zero data gradient: all inputs are zero).
    model = nn.Linear(4000, 1, bias=False)
    nn.init.zeros_(model.weight)
    dp = ExampleDP(model, cfg, rank=0, world=4, seed=0, split_noise=True, sample_rate=0.1, expected_batch=1.0)
    grad, _ = dp.gradient(torch.zeros(1, 4000), torch.zeros(1, dtype=torch.long))
    assert float(grad.std()) == pytest.approx(1.5, rel=0.05)


def test_empty_poisson_batch_sends_noise_only_scaled_by_the_expected_batch() -> None:
    """A rank whose Poisson batch is empty still sends: zero gradient + its noise, / expected batch."""
    model = nn.Linear(4000, 1, bias=False)
    empty_x, empty_y = torch.zeros(0, 4000), torch.zeros(0, dtype=torch.long)
    quiet = ExampleDP(model, DPConfig(clip=1.0, noise_multiplier=0.0), **_one_rank(expected_batch=4.0))
    grad, loss_sum = quiet.gradient(empty_x, empty_y)
    assert grad.shape == (4000,) and not grad.any() and loss_sum == 0.0
    noisy = ExampleDP(model, DPConfig(clip=2.0, noise_multiplier=1.5), **_one_rank(expected_batch=4.0))
    grad, _ = noisy.gradient(empty_x, empty_y)
    assert float(grad.std()) == pytest.approx(3.0 / 4.0, rel=0.05)


def _one_rank(expected_batch: float) -> dict:
    return {"rank": 0, "world": 1, "seed": 0, "split_noise": True, "sample_rate": 0.1, "expected_batch": expected_batch}


SPECS = ["randomk(ratio=0.5, seed=1) | ef", "rtopk(ratio=0.1, r=0.2) | ef"]  # linear, then non-linear
DP = {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
# 52 training examples, expected local batch 1: about a third of the local Poisson batches are empty.
SPARSE = {"name": "synthetic", "args": {"num_params": 200, "num_examples": 64, "input_dim": 8}}


def _jobs() -> dict[str, TrainJob]:
    common = {"name": "dp", "checkpoint": {"every_epochs": 0}, "dp": DP}
    jobs = {
        spec: {
            "task": "digits-mlp",
            "epochs": 2,
            "batch_size": 64,
            "compression": spec,
            "optimizer": {"name": "momentum", "lr": 0.5, "momentum": 0.5},
        }
        for spec in SPECS
    }
    jobs["sparse"] = {"task": SPARSE, "epochs": 1, "batch_size": 1, "compression": "none"}
    return {key: TrainJob.model_validate({**common, **job}) for key, job in jobs.items()}


def _worker(rank: int, out_dir: str) -> None:
    out = {}
    for key, job in _jobs().items():
        events: list[dict] = []
        session = Session(
            rank, 2, torch.device("cpu"), lambda m, d: None, progress=lambda e, sink=events: sink.extend(e["events"])
        )
        train_worker(job, session)
        out[key] = [e for e in events if e["type"] in ("epoch", "step")]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def dp_runs() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_worker, (tmp,), world=2)
        return json.loads(Path(tmp, "rank0.json").read_text())


@pytest.mark.parametrize("spec", SPECS)
def test_dp_training_reports_epsilon_per_epoch(dp_runs: dict, spec: str) -> None:
    epochs = [e for e in dp_runs[spec] if e["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    eps = [e["epsilon"] for e in epochs]
    assert 0 < eps[0] < eps[1] < math.inf
    assert all(e["delta"] == 1e-5 for e in epochs)
    assert epochs[-1]["test_accuracy"] > 0.2  # learning despite the noise (chance is 0.1)


@pytest.mark.parametrize("key", [*SPECS, "sparse"])
def test_accountant_is_charged_the_poisson_samplers_rate(dp_runs: dict, key: str) -> None:
    """The epsilon a run reports is Opacus' for (sigma, the sampler's own q, the steps taken)."""
    job = _jobs()[key]
    plan = PoissonPlan.for_job(len(load_task(job.task.name, **job.task.args).train_set), job.batch_size, 2)
    last = [e for e in dp_runs[key] if e["type"] == "epoch"][-1]
    assert last["step"] == job.epochs * plan.steps_per_epoch
    expected = gaussian_epsilon(DP["noise_multiplier"], last["step"], DP["delta"], sample_rate=plan.sample_rate)
    assert last["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_empty_batches_keep_ranks_in_step(dp_runs: dict) -> None:
    """With many empty local batches every rank still took every step (none hung, none skipped)."""
    steps = [e for e in dp_runs["sparse"] if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 27))
    assert any(e["loss"] is None or math.isnan(e["loss"]) for e in steps)  # rank 0 had empty batches
