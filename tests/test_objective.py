"""A task's objective is the loss of every training path: a regression task (mean squared error,
defined here as a `module:function` entry point) trained by the federated client, the vectorised
cohort, DP-SGD's per-example gradients, the audit's victim gradients and the data-parallel loop.

Each path is checked against the same computation written with `nn.functional.mse_loss`, so a
path that still computed cross-entropy (which accepts these float targets as soft labels
without complaint) would fail."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradcomp.audit.observe import make_setting, observe
from gradcomp.config.train import DPConfig
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import ClientData, dataset_view
from gradcomp.fedclient.runtime import ClientRuntime
from gradcomp.fedclient.train import SGDConfig, client_batches, train_one
from gradcomp.sim.cohort import CohortClient, CohortTrainer
from gradcomp.tasks import Classification, NextToken, Objective, Task, load_task
from gradcomp.worker.dp import ExampleDP

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
    """y = 3 x W + 0.5 over 4x4 inputs in [0, 1) (square, so the audit can treat them as images)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(INPUTS, OUTPUTS, generator=gen)
    x = torch.rand(examples + test, INPUTS, generator=gen)
    y = 3.0 * x @ weight + 0.5

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
