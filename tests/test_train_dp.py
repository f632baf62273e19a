"""Example-level DP in data-parallel training: per-example clipping against a loop reference,
noise placement, and the full loop in a real 2-process gloo group: epsilon per epoch, the noise
each aggregation mode really releases (measured on a model whose gradients are all zero), and a
resume that draws fresh noise and charges the steps lost with the failed run."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from scipy.stats import norm
from torch import nn
from torch.utils.data import TensorDataset

from gradcomp.config.train import DPConfig, TrainJob
from gradcomp.privacy import gaussian_epsilon
from gradcomp.tasks import Task, load_task
from gradcomp.worker.checkpoint import release_bound
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.local_group import spawn_gloo_ranks
from gradcomp.worker.loop import Session, train_worker
from gradcomp.worker.sampling import PoissonPlan
from gradcomp.worker.session import STATE_FILE, rank_file


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_per_example_clipping_matches_a_loop() -> None:
    model = _model()
    cfg = DPConfig(clip=0.5, noise_multiplier=0.0)
    dp = ExampleDP(model, cfg, world=1, split_noise=True, sample_rate=0.1, expected_batch=7.0, noise_seed=0)
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
    split = ExampleDP(_model(), cfg, world=4, split_noise=True, sample_rate=0.1, expected_batch=1.0)
    full = ExampleDP(_model(), cfg, world=4, split_noise=False, sample_rate=0.1, expected_batch=1.0)
    assert split.noise_std == pytest.approx(3.0 / 2) and full.noise_std == pytest.approx(3.0)
    # The noise is really there, at that scale (zero data gradient: all inputs are zero).
    model = nn.Linear(4000, 1, bias=False)
    nn.init.zeros_(model.weight)
    dp = ExampleDP(model, cfg, world=4, split_noise=True, sample_rate=0.1, expected_batch=1.0)
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
    return {"world": 1, "split_noise": True, "sample_rate": 0.1, "expected_batch": expected_batch}


SPECS = ["randomk(ratio=0.5, seed=1) | ef", "rtopk(ratio=0.1, r=0.2) | ef"]  # linear, then non-linear
DP = {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
# 52 training examples, expected local batch 1: about a third of the local Poisson batches are empty.
SPARSE = {"name": "synthetic", "args": {"num_params": 200, "num_examples": 64, "input_dim": 8}}
ZERO_INPUTS, CLASSES, LOCAL_BATCH = 2000, 10, 4  # 20,000 parameters, expected global batch 8


def zero_gradient_task(examples: int) -> Task:
    """A bias-free linear model on all-zero inputs, initialised at zero: every per-example gradient is
    exactly zero, so what an SGD step (lr 1) moves the weights by is minus the released noise."""

    def make() -> nn.Module:
        model = nn.Linear(ZERO_INPUTS, CLASSES, bias=False)
        nn.init.zeros_(model.weight)
        return model

    data = TensorDataset(torch.zeros(examples, ZERO_INPUTS), torch.zeros(examples, dtype=torch.long))
    return Task("zero-gradients", make, data, None)


# Per aggregation mode: the measured statistic of the released gradient, and what it must be at
# sigma * clip = 1, world 2, expected local batch 4 (global 8).
NOISE = {
    "none": ("std", 1 / 8),  # linear: each rank adds 1/sqrt(2), the sum carries 1 once
    "randomk(ratio=0.5, seed=1) | ef": ("std", 1 / 8),  # linear (shared positions), over the kept half
    "fp16": ("std", math.sqrt(2) / 8),  # non-linear: each rank adds the full 1, the mean carries sqrt(2)
    # non-linear: each rank keeps 1,000 values drawn from its top 20% magnitudes of N(0, (1/4)^2), the
    # mean halves them; the median kept magnitude is then Phi^-1(1 - 0.2 / 4) / 4 / 2
    "rtopk(ratio=0.05, r=0.2) | ef": ("median_abs", float(norm.ppf(1 - 0.2 / 4)) / 4 / 2),
}


def _zero_job(name: str, spec: str, steps: int, **extra: Any) -> TrainJob:
    task = {"name": f"{__name__}:zero_gradient_task", "args": {"examples": 2 * LOCAL_BATCH * steps}}
    data = {"name": name, "task": task, "epochs": 1, "batch_size": LOCAL_BATCH, "compression": spec}
    data |= {"optimizer": {"name": "sgd", "lr": 1.0}, "dp": DP, **extra}
    return TrainJob.model_validate(data)


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
    jobs["sparse"] = {
        "task": SPARSE,
        "epochs": 1,
        "batch_size": 1,
        "compression": "none",
        "dp": {**DP, "unprotected_metrics": True},
    }
    return {key: TrainJob.model_validate({**common, **job}) for key, job in jobs.items()}


def _run(rank: int, job: TrainJob, restore: Path | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Train `job` on this rank; its events (rank 0's) and, per checkpoint, the reported metrics, the
    weights and the ledger's step count; `keep` collects every checkpoint (all ranks' files) by step."""
    events: list[dict] = []
    reports: list[dict] = []

    def report(metrics: dict, where: Path | None) -> None:
        if where is None:
            return
        if keep is not None:
            shutil.copytree(where, keep / f"step-{metrics['step']}", dirs_exist_ok=True)
        if rank == 0:
            state = torch.load(where / STATE_FILE, weights_only=False)
            ledger = torch.load(where / rank_file(0), weights_only=False)["dp"]["ledger"]
            steps = sum(n for _, _, n in ledger["history"])
            reports.append({**metrics, "weight": state["model"]["weight"], "ledger_steps": steps})

    session = Session(rank, 2, torch.device("cpu"), report, restore, progress=lambda e: events.extend(e["events"]))
    train_worker(job, session)
    return {"events": [e for e in events if e["type"] in ("epoch", "step")], "reports": reports}


def _released_noise(rank: int) -> dict[str, float]:
    """One DP step per aggregation mode on the zero-gradient model: the statistic of what was released."""
    out = {}
    for spec, (stat, _) in NOISE.items():
        reports = _run(rank, _zero_job("noise", spec, steps=1))["reports"]
        if rank == 0:
            released = -reports[-1]["weight"].flatten().double()
            kept = released[released != 0]
            out[spec] = float(kept.std()) if stat == "std" else float(kept.abs().median())
    return out


def _resume(rank: int, tmp: Path) -> dict[str, Any]:
    """6 steps, a checkpoint every 2; then a run restored from step 2's checkpoint, as after a failure."""
    job = _zero_job("resume", "none", steps=6, checkpoint={"every_steps": 2, "every_epochs": 1})
    first = _run(rank, job, keep=tmp)
    dist.barrier()  # every rank's files are in step-2/ before anyone restores from it
    again = _run(rank, job, restore=tmp / "step-2")
    if rank != 0:
        return {}
    at = {r["step"]: r for r in first["reports"]}
    return {
        "first_step4": at[4]["weight"].tolist(),
        "again": [{k: v for k, v in r.items() if k != "weight"} for r in again["reports"]],
        "again_step4": next(
            r["weight"] for r in again["reports"] if r["step"] == 4 and "charged_lost_steps" not in r
        ).tolist(),
        "epoch": [e for e in again["events"] if e["type"] == "epoch"][-1],
    }


def _worker(rank: int, out_dir: str) -> None:
    out: dict[str, Any] = {key: _run(rank, job)["events"] for key, job in _jobs().items()}
    out["noise"] = _released_noise(rank)
    checkpoints = Path(out_dir, "checkpoints")
    checkpoints.mkdir(exist_ok=True)
    out["resume"] = _resume(rank, checkpoints)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def dp_runs() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_worker, (tmp,), world=2)
        return json.loads(Path(tmp, "rank0.json").read_text())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.slow
def test_dp_training_reports_epsilon_per_epoch(dp_runs: dict, spec: str) -> None:
    epochs = [e for e in dp_runs[spec] if e["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    eps = [e["epsilon"] for e in epochs]
    assert 0 < eps[0] < eps[1] < math.inf
    assert all(e["delta"] == 1e-5 for e in epochs)
    assert epochs[-1]["test_accuracy"] > 0.2  # learning despite the noise (chance is 0.1)


@pytest.mark.parametrize("key", [*SPECS, "sparse"])
@pytest.mark.slow
def test_accountant_is_charged_the_poisson_samplers_rate(dp_runs: dict, key: str) -> None:
    """The epsilon a run reports is Opacus' for (sigma, the sampler's own q, the steps taken); the
    figure against one rank's messages uses that rank's own noise: sigma / sqrt(2) when split."""
    job = _jobs()[key]
    plan = PoissonPlan.for_job(len(load_task(job.task.name, **job.task.args).train_set), job.batch_size, 2)
    last = [e for e in dp_runs[key] if e["type"] == "epoch"][-1]
    assert last["step"] == job.epochs * plan.steps_per_epoch
    expected = gaussian_epsilon(DP["noise_multiplier"], last["step"], DP["delta"], sample_rate=plan.sample_rate)
    assert last["epsilon"] == pytest.approx(expected, rel=1e-9)
    rank_sigma = DP["noise_multiplier"] / (math.sqrt(2) if key != SPECS[1] else 1.0)
    per_rank = gaussian_epsilon(rank_sigma, last["step"], DP["delta"], sample_rate=plan.sample_rate)
    assert last["epsilon_rank_message"] == pytest.approx(per_rank, rel=1e-9)


@pytest.mark.slow
def test_unnoised_metrics_stay_in_unless_asked_for(dp_runs: dict) -> None:
    """Under DP the per-step loss, drawn batch size and epoch train loss leave the workers only with
    dp.unprotected_metrics (the sparse job sets it)."""
    for spec in SPECS:
        assert all("loss" not in e and "examples" not in e and "train_loss" not in e for e in dp_runs[spec])
    assert all("examples" in e for e in dp_runs["sparse"] if e["type"] == "step")


@pytest.mark.slow
def test_empty_batches_keep_ranks_in_step(dp_runs: dict) -> None:
    """With many empty local batches every rank still took every step (none hung, none skipped)."""
    steps = [e for e in dp_runs["sparse"] if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 27))
    assert any(e["examples"] == 0 and (e["loss"] is None or math.isnan(e["loss"])) for e in steps)


@pytest.mark.parametrize("spec", list(NOISE))
@pytest.mark.slow
def test_the_loop_releases_the_noise_its_aggregation_needs(dp_runs: dict, spec: str) -> None:
    """Measured, not configured: a linear mode must release sigma * clip / expected global batch once,
    a non-linear one (fp16, rtopk) sqrt(world) times that, each rank having added the full noise. A
    split for rtopk would give 1/sqrt(2) of the expected value; 20,000 draws measure it within ~2%."""
    _, expected = NOISE[spec]
    assert dp_runs["noise"][spec] == pytest.approx(expected, rel=0.08)


@pytest.mark.slow
def test_resume_draws_fresh_noise_and_charges_the_lost_steps(dp_runs: dict) -> None:
    """Restored at step 2 (checkpoints every 2 steps): steps 3-4 were released by the failed run and
    their checkpoint lost, so the resume charges 2 steps at once (checkpointed before training on),
    then redoes steps 3-6 with new noise: 2 + 2 + 4 = 8 steps charged, and step 4's weights differ."""
    resume = dp_runs["resume"]
    charge = resume["again"][0]
    assert charge["charged_lost_steps"] == 2 and charge["step"] == 2 and charge["ledger_steps"] == 4
    assert [r["ledger_steps"] for r in resume["again"][1:]] == [6, 8]
    assert resume["first_step4"] != resume["again_step4"]  # a reused generator would give the same weights
    q = 2 * LOCAL_BATCH / (2 * LOCAL_BATCH * 6)
    assert resume["epoch"]["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 8, 1e-5, sample_rate=q), rel=1e-9)


@pytest.mark.parametrize(
    ("every_steps", "every_epochs", "steps_per_epoch", "epochs", "at", "bound"),
    [
        (2, 1, 6, 1, (0, 2, 2), 2),  # next: step 4
        (2, 1, 6, 1, (0, 4, 4), 2),  # next: the epoch's end, 6
        (2, 1, 6, 1, (1, 0, 6), 0),  # the run's end: nothing more to release
        (0, 5, 10, 20, (5, 0, 50), 50),  # next: the end of epoch 10
        (10, 0, 10, 3, (1, 0, 10), 20),  # every_steps skips epoch ends, no epoch checkpoints: the run's end
        (4, 0, 5, 2, (0, 3, 3), 1),  # a world change moved the epoch ends off the global grid: next is step 4
    ],
)
def test_release_bound_is_the_distance_to_the_next_checkpoint(
    every_steps: int, every_epochs: int, steps_per_epoch: int, epochs: int, at: tuple[int, int, int], bound: int
) -> None:
    """What a resume charges: every step the run could release before its next checkpoint (or its end)."""
    checkpoint = {"every_steps": every_steps, "every_epochs": every_epochs}
    job = TrainJob.model_validate({"name": "b", "epochs": epochs, "checkpoint": checkpoint})
    run = SimpleNamespace(job=job, steps_per_epoch=steps_per_epoch)
    assert release_bound(run, *at) == bound  # type: ignore[arg-type]
