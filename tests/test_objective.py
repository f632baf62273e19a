"""A task's objective is the loss of every training path: a regression task (mean squared error,
defined here as a `module:function` entry point) trained by the federated client, the vectorised
cohort, DP-SGD's per-example gradients, the audit's victim gradients and the data-parallel loop.

Each path is checked against the same computation written with `nn.functional.mse_loss`, so a
path that still computed cross-entropy (which accepts these float targets as soft labels
without complaint) would fail."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from gradcomp.audit.config import AuditConfig
from gradcomp.audit.observe import make_setting, observe
from gradcomp.audit.run import audit_specs
from gradcomp.cli import main
from gradcomp.config.common import ConfigError
from gradcomp.config.train import DPConfig, TaskConfig, TrainJob
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import ClientData, dataset_view
from gradcomp.fedclient.runtime import ClientRuntime
from gradcomp.fedclient.train import SGDConfig, client_batches, train_one
from gradcomp.sim.cohort import CohortClient, CohortTrainer
from gradcomp.sim.setup import build_simulation, load_fedsim_job
from gradcomp.tasks import Classification, NextToken, Objective, Task, load_task
from gradcomp.tasks.images import ImageSet
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.launch import describe
from gradcomp.worker.local_group import spawn_gloo_ranks
from gradcomp.worker.loop import Session, train_worker

INPUTS, OUTPUTS = 16, 2


class MeanSquaredError(Objective):
    """Per example: the mean over outputs of the squared error; metrics: loss and mean absolute error."""

    name = "mse"

    def per_example(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((output - target) ** 2).mean(dim=-1)

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {
            "loss": float(self.per_example(output, target).sum()),
            "abs": float((output - target).abs().mean(dim=-1).sum()),
            "examples": float(target.shape[0]),
        }

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"] / sums["examples"], "mae": sums["abs"] / sums["examples"]}


def regression_task(examples: int = 192, test: int = 64, seed: int = 0) -> Task:
    """y = x W + 0.5 over 4x4 inputs in [0, 1) (square, so the audit can treat them as images)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(INPUTS, OUTPUTS, generator=gen)
    x = torch.rand(examples + test, INPUTS, generator=gen)
    y = x @ weight + 0.5

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(INPUTS, 8), nn.Tanh(), nn.Linear(8, OUTPUTS))

    train, held_out = TensorDataset(x[:examples], y[:examples]), TensorDataset(x[examples:], y[examples:])
    return Task("regression", make, train, held_out, num_classes=0, objective=MeanSquaredError())


ENTRY = f"{__name__}:regression_task"


def _reference_sgd(model: nn.Module, data: ClientData, cfg: SGDConfig, seed: int) -> dict[str, torch.Tensor]:
    """The client's local training written with torch.optim.SGD and mse_loss."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    for batch in client_batches(data.num_examples, cfg, seed):
        x, y = data.batch(batch)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_objectives_losses_and_metrics() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    ce = nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(Classification().per_example(logits, labels), ce)
    sums = Classification().batch_sums(logits, labels)
    assert Classification().metrics(sums) == pytest.approx({"loss": float(ce.mean()), "accuracy": 0.5})
    # next-token: [B, T, V] logits, [B, T] targets; an example's loss is the mean over its tokens
    gen = torch.Generator().manual_seed(0)
    out, tokens = torch.randn(3, 5, 7, generator=gen), torch.randint(0, 7, (3, 5), generator=gen)
    per_token = nn.functional.cross_entropy(out.reshape(15, 7), tokens.reshape(15), reduction="none").view(3, 5)
    lm = NextToken(unit="character")
    torch.testing.assert_close(lm.per_example(out, tokens), per_token.mean(dim=1))
    got = lm.metrics(lm.batch_sums(out, tokens))
    nats = float(per_token.mean())
    assert got == pytest.approx(
        {"loss": nats, "perplexity": math.exp(nats), "bits_per_character": nats / math.log(2)}, rel=1e-6
    )


def test_a_task_evaluates_with_its_own_metrics() -> None:
    task = load_task(ENTRY)
    torch.manual_seed(0)
    model = task.make_model()
    x, y = task.test_set.tensors  # type: ignore[union-attr]
    got = task.evaluate(model, batch_size=10)  # uneven batches: the sums make the metric exact
    with torch.no_grad():
        assert got["loss"] == pytest.approx(float(nn.functional.mse_loss(model(x), y)), rel=1e-5)
        assert got["mae"] == pytest.approx(float((model(x) - y).abs().mean()), rel=1e-5)
    assert "accuracy" not in got
    assert load_task("digits-mlp").objective.class_labels and not task.objective.class_labels
    assert task.labels().unique().tolist() == [0]  # no classes: a partitioner sees one label
    # a dataset that gathers its own batches: labels read a chunk at a time, in order
    labels = torch.arange(5000) % 7
    images = ImageSet(torch.zeros(5000, 1, 2, 2, dtype=torch.uint8), labels, (0.5,), (0.5,))
    assert torch.equal(Task("images", nn.Flatten, images).labels(), labels)


def test_federated_client_trains_the_tasks_loss() -> None:
    cfg = LocalTrainingConfig(task=ENTRY, epochs=2, batch_size=16, lr=0.05, momentum=0.5, spec="none", seed=3)
    rt = ClientRuntime(cfg)
    torch.manual_seed(0)
    model = rt.task.make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = dataset_view(rt.task.train_set).subset(torch.arange(5, 75).numpy())
    got = rt.trainer.train(start, data, cfg, seed=11)
    want = _reference_sgd(model, data, SGDConfig.of(cfg), seed=11)
    for k, v in want.items():
        torch.testing.assert_close(got.params[k], v, rtol=1e-5, atol=1e-6)
    assert got.num_examples == 70


def test_vectorised_cohort_trains_the_tasks_loss() -> None:
    task = load_task(ENTRY)
    torch.manual_seed(0)
    model = task.make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SGDConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9)
    shards = [torch.arange(0, 30), torch.arange(30, 37), torch.arange(40, 41), torch.arange(50, 90)]
    clients = [CohortClient(s.numpy(), seed) for seed, s in enumerate(shards)]
    got = CohortTrainer(model, task.train_set, cfg, task.objective).train(start, clients)
    for c, trained in zip(clients, got, strict=True):
        model.load_state_dict(start)
        data = ClientData(task.train_set, torch.from_numpy(c.indices))
        _, loss, steps = train_one(model, data, cfg, c.seed, task.objective)
        model.load_state_dict(start)
        want = _reference_sgd(model, data, cfg, c.seed)
        assert trained.steps == steps and trained.train_loss == pytest.approx(loss, rel=1e-5)
        for k, v in trained.params.items():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)


def test_dp_sgd_clips_per_example_gradients_of_the_tasks_loss() -> None:
    task = load_task(ENTRY)
    torch.manual_seed(0)
    model = task.make_model()
    dp = ExampleDP(
        model,
        DPConfig(clip=0.5, noise_multiplier=0.0),
        world=1,
        split_noise=True,
        sample_rate=0.1,
        expected_batch=6.0,
        noise_seed=0,
        objective=task.objective,
    )
    x, y = task.train_set.tensors  # type: ignore[union-attr]
    got, loss_sum = dp.gradient(x[:6], y[:6])
    total, losses = torch.zeros_like(got), []
    for i in range(6):
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        losses.append(float(loss))
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        total += flat * min(1.0, 0.5 / float(flat.norm()))
    torch.testing.assert_close(got, total / 6, rtol=1e-5, atol=1e-6)
    assert loss_sum == pytest.approx(sum(losses), rel=1e-5)


def test_audit_attacks_the_gradient_of_the_tasks_loss() -> None:
    task = load_task(ENTRY)
    setting = make_setting(task, victims=4, seed=0)
    obs, truth = observe(setting, "none", batch=2, seed=0)
    model = setting.model
    for g in range(2):
        model.zero_grad()
        ids = truth.victim_ids[g]
        nn.functional.mse_loss(model(setting.test_x[ids]), setting.test_y[ids]).backward()
        want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(truth.gradient[g], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obs.observed, truth.gradient)
    # the whole audit runs on this task: on the uncompressed gradient the attacks find every victim
    config = AuditConfig(task=ENTRY, victims=4, batch_sizes=(1,), iterations=20)
    (entry,) = [a.entry for a in audit_specs(["none"], config)]
    assert entry["reidentification"] == 1.0 and entry["verdict"] == "leaks"


# --- the data-parallel loop, in a real 2-rank gloo group ---------------------------------------

TRAIN_JOBS: dict[str, dict[str, Any]] = {
    "compressed": {"compression": "topk(ratio=0.5) | ef"},
    "dense-fp32": {},
    "dense-bf16": {"precision": "bf16"},
    "dp-sgd": {"dp": {"clip": 1.0, "noise_multiplier": 0.3, "unprotected_metrics": True}},
}


def _train_job(key: str) -> TrainJob:
    data = {
        "name": key,
        "task": {"name": ENTRY},
        "epochs": 8,
        "batch_size": 16,
        "optimizer": {"name": "momentum", "lr": 0.1, "momentum": 0.5},
        "checkpoint": {"every_epochs": 0},
    }
    return TrainJob.model_validate(data | TRAIN_JOBS[key])


def _collect(events: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    return lambda handed: events.extend(handed["events"])


def _train_ranks(rank: int, out_dir: str) -> None:
    out = {}
    for key in TRAIN_JOBS:
        events: list[dict[str, Any]] = []
        session = Session(rank, 2, torch.device("cpu"), lambda m, d: None, progress=_collect(events))
        train_worker(_train_job(key), session)
        out[key] = [e for e in events if e["type"] == "epoch"]
    if rank == 0:
        Path(out_dir, "epochs.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def train_runs() -> dict[str, list[dict[str, Any]]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_train_ranks, (tmp,), world=2)
        return json.loads(Path(tmp, "epochs.json").read_text())


def _initial_test_loss(job: TrainJob) -> float:
    torch.manual_seed(job.seed)  # as the loop starts: the same initial model
    task = load_task(job.task.name)
    return task.evaluate(task.make_model())["loss"]


@pytest.mark.parametrize("key", list(TRAIN_JOBS))
def test_data_parallel_training_minimises_the_tasks_loss(train_runs: dict, key: str) -> None:
    epochs = train_runs[key]
    start = _initial_test_loss(_train_job(key))
    assert len(epochs) == 8
    last = epochs[-1]
    assert "test_mae" in last and "test_accuracy" not in last  # the objective's own metrics
    reached = 0.5 if key == "dp-sgd" else 0.25  # clipped and noised steps learn more slowly
    assert last["test_loss"] < reached * start, (start, [e["test_loss"] for e in epochs])


def test_bf16_autocasts_the_forward_and_sends_fp32_gradients(train_runs: dict) -> None:
    fp32, bf16 = train_runs["dense-fp32"], train_runs["dense-bf16"]
    # the same fp32 gradients on the wire: every byte of a dense fp32 all-reduce, counted alike
    assert [e["bytes_sent"] for e in bf16] == [e["bytes_sent"] for e in fp32]
    assert bf16[0]["bytes_sent"] == bf16[0]["dense_bytes"]
    params = sum(p.numel() for p in load_task(ENTRY).make_model().parameters())
    assert bf16[0]["dense_bytes"] == 2 * 6 * params * 4  # 2 ranks x 6 steps x fp32 values
    # ... computed from a bf16 forward pass: close to fp32's training, but not the same numbers
    assert bf16[-1]["train_loss"] != fp32[-1]["train_loss"]
    assert bf16[-1]["test_loss"] == pytest.approx(fp32[-1]["test_loss"], rel=0.2)


# --- models the functional paths cannot take: refused or routed when the job is loaded ---------


def batchnorm_task() -> Task:
    """The regression task on a model with batch normalisation (running statistics)."""
    task = regression_task()
    task.make_model = lambda: nn.Sequential(nn.Linear(INPUTS, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, OUTPUTS))
    return task


def _fed_job(tmp_path: Path, task: str, vectorize: str) -> Path:
    data = {
        "name": f"fed-{vectorize}",
        "task": {"name": task},
        "rounds": 3,
        "clients": {"expected": 8},
        "round": {"fraction": 0.5, "min_clients": 1},
        "local": {"epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.5},
        "compression": "randomk(ratio=0.5) | ef",
        "simulation": {"actors": 0, "vectorize": vectorize},
    }
    path = tmp_path / f"{vectorize}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_fedsim_trains_the_tasks_loss_and_says_which_mode_ran(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert main(["fedsim", str(_fed_job(tmp_path, ENTRY, "auto")), "--runs-dir", str(runs)]) == 0
    final = json.loads((runs / "fed-auto" / "results.json").read_text())["final"]
    assert final["training"] == "vectorised" and final["sequential_reason"] is None
    assert "mae" in final and "accuracy" not in final  # the objective's metrics of the global model
    torch.manual_seed(0)
    assert final["loss"] < _initial_test_loss(_train_job("dense-fp32"))


def test_a_batchnorm_model_is_routed_or_refused_at_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bn = f"{__name__}:batchnorm_task"
    with pytest.raises(ConfigError, match=r"vectorize is on, but layer '1' \(BatchNorm1d\).*GroupNorm"):
        build_simulation(load_fedsim_job(_fed_job(tmp_path, bn, "on")), quiet=True)
    runs = tmp_path / "runs"
    assert main(["fedsim", str(_fed_job(tmp_path, bn, "auto")), "--runs-dir", str(runs)]) == 0
    assert "clients train one at a time: layer '1' (BatchNorm1d)" in capsys.readouterr().out
    final = json.loads((runs / "fed-auto" / "results.json").read_text())["final"]
    assert final["training"] == "sequential" and "GroupNorm" in final["sequential_reason"]
    # DP-SGD: refused when the job is described on the driver, and again on every rank before step 1
    job = _train_job("dp-sgd").model_copy(update={"task": TaskConfig(name=bn)})
    with pytest.raises(ConfigError, match=r"dp: layer '1' \(BatchNorm1d\) normalises with batch statistics.*GroupNorm"):
        describe(job)
    session = Session(0, 1, torch.device("cpu"), lambda m, d: None)
    with pytest.raises(ConfigError, match="GroupNorm"):
        train_worker(job, session)
    assert describe(_train_job("dense-fp32").model_copy(update={"task": TaskConfig(name=bn)}))["parameters"] > 0


# --- next-token objective through the functional paths (a bigram model on token windows) -------


class _Bigram(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 6):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))  # [B, T, V]


def _token_windows(n: int = 40, block: int = 5) -> TensorDataset:
    stream = torch.randint(0, 11, (n + block + 1,), generator=torch.Generator().manual_seed(2))
    windows = torch.stack([stream[i : i + block + 1] for i in range(n)])
    return TensorDataset(windows[:, :-1], windows[:, 1:])


def test_next_token_objective_in_the_cohort_and_dp_sgd() -> None:
    data, objective = _token_windows(), NextToken(unit="byte")
    torch.manual_seed(0)
    model = _Bigram()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SGDConfig(epochs=1, batch_size=4, lr=0.5)
    clients = [CohortClient(np.arange(0, 9), 1), CohortClient(np.arange(9, 30), 2)]
    got = CohortTrainer(model, data, cfg, objective).train(start, clients)
    for c, trained in zip(clients, got, strict=True):
        model.load_state_dict(start)
        train_one(model, ClientData(data, torch.from_numpy(c.indices)), cfg, c.seed, objective)
        for k, v in trained.params.items():
            torch.testing.assert_close(v, model.state_dict()[k], rtol=1e-5, atol=1e-6)
    model.load_state_dict(start)
    dp = ExampleDP(model, DPConfig(clip=0.1, noise_multiplier=0.0), world=1, split_noise=True, sample_rate=0.1,
                   expected_batch=3.0, noise_seed=0, objective=objective)  # fmt: skip
    x, y = data.tensors
    flat, _ = dp.gradient(x[:3], y[:3])
    want = torch.zeros_like(flat)
    for i in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]).reshape(-1, 11), y[i]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        want += g * min(1.0, 0.1 / float(g.norm()))
    torch.testing.assert_close(flat, want / 3, rtol=1e-5, atol=1e-7)
    # precision: bf16 autocasts the forward passes; the clipped sum stays fp32, close to fp32's
    dp.autocast = torch.bfloat16
    low, _ = dp.gradient(x[:3], y[:3])
    assert low.dtype == torch.float32 and not torch.equal(low, flat)
    torch.testing.assert_close(low, flat, rtol=0.1, atol=2e-3)
