"""Vectorised cohort training: the same updates as training each client alone, and the fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_yaml
from torch import nn
from torch.utils.data import TensorDataset

from gradcomp.cli import main
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import ClientData
from gradcomp.fedclient.seeds import round_seed
from gradcomp.fedclient.train import SGDConfig, num_steps, train_one
from gradcomp.keyed_random import new_key
from gradcomp.partition import partition
from gradcomp.sim.client import ClientJob, SimClientRunner
from gradcomp.sim.cohort import CohortClient, CohortTrainer, bucket, plan_groups, why_not_vectorizable
from gradcomp.sim.pool import split_cohort
from gradcomp.sim.setup import build_simulation, load_fedsim_job
from gradcomp.sim.state import client_name
from gradcomp.tasks import Classification, load_task

SECRET = new_key()  # the simulation secret the runners' client noise keys derive from


def _sequential(model: nn.Module, start, dataset, clients, cfg, objective):
    out = []
    for c in clients:
        model.load_state_dict(start)
        idx = torch.from_numpy(c.indices.astype(np.int64))
        state, loss, steps = train_one(model, ClientData(dataset, idx), cfg, c.seed, objective)
        out.append(({k: v.clone() for k, v in state.items()}, loss, steps))
    return out


@pytest.mark.parametrize(("task_name", "momentum"), [("digits-mlp", 0.0), ("digits-mlp", 0.9), ("digits-cnn", 0.0)])
def test_vectorised_updates_equal_sequential(task_name: str, momentum: float) -> None:
    task = load_task(task_name, **({"channels": 4} if task_name == "digits-cnn" else {}))
    y = task.train_set.tensors[1]
    shards = partition(y.numpy(), 60, "dirichlet(alpha=0.5)", seed=1)[:8]  # unequal shards: 1 to 40 examples
    clients = [CohortClient(s, round_seed(0, client_name(i), 1)) for i, s in enumerate(shards)]
    cfg = SGDConfig(epochs=2, batch_size=8, lr=0.05, momentum=momentum)
    torch.manual_seed(0)
    model = task.make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    want = _sequential(model, start, task.train_set, clients, cfg, task.objective)
    trainer = CohortTrainer(model, task.train_set, cfg, task.objective)
    # every call replays the recorded step of its shapes (recorded on first use)
    for _ in range(3):
        got = trainer.train(start, clients)
        for (ref, loss, steps), t in zip(want, got, strict=True):
            assert t.steps == steps
            assert t.train_loss == pytest.approx(loss, abs=1e-5)
            for k, v in t.params.items():
                torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)
    assert trainer.step.replays, "a shape seen twice is replayed from its recording"


def test_groups_cover_the_cohort_once() -> None:
    cfg = SGDConfig(epochs=5, batch_size=10, lr=0.1)
    sizes = [1, 2, 2, 3, 40, 41, 7, 90, 1, 1, 12]
    for params in (10_000, 1_000_000):
        groups = plan_groups(sizes, cfg, params)
        assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    # a large model is compute-bound: the 90-example client does not drag the 1-example ones along
    big = plan_groups(sizes, cfg, 1_000_000)
    assert len(big) > 1 and sizes[big[0][0]] == 90
    assert num_steps(90, cfg) == 45 and bucket(5) == 6 and bucket(33, 10) == 10 and bucket(600) == 1024


def test_models_that_cannot_be_vectorised_are_named() -> None:
    assert why_not_vectorizable(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) is None
    assert "running statistics" in str(why_not_vectorizable(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))))
    assert "random masks" in str(why_not_vectorizable(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))))
    with pytest.raises(ValueError, match="vectorised"):
        CohortTrainer(
            nn.Sequential(nn.Linear(64, 4), nn.BatchNorm1d(4)),
            TensorDataset(torch.zeros(2, 64), torch.zeros(2)),
            SGDConfig(1, 2, 0.1),
            Classification(),
        )


def _local() -> LocalTrainingConfig:
    return LocalTrainingConfig(
        task="digits-mlp", epochs=1, batch_size=8, lr=0.1, momentum=0.0, spec="rtopk(ratio=0.1, r=0.3) | ef", seed=0,
        task_args={"hidden": 16},
    )  # fmt: skip


def test_trainer_switch() -> None:
    assert SimClientRunner(_local(), SECRET, "auto").vectorized and SimClientRunner(_local(), SECRET, "on").vectorized
    off = SimClientRunner(_local(), SECRET, "off")
    assert not off.vectorized and "off" in str(off.fallback)


def test_split_cohort_balances_chunks() -> None:
    jobs = [ClientJob(i, 1, 0, np.arange(n)) for i, n in enumerate([50, 1, 1, 30, 20, 2])]
    chunks = split_cohort(jobs, 2)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    loads = [sum(jobs[i].indices.size for i in c) for c in chunks]
    assert max(loads) - min(loads) <= 2
    assert split_cohort(jobs[:1], 4) == [[0]]


def _job(tmp_path: Path, vectorize: str, **sim: object) -> Path:
    data = {
        "name": f"v-{vectorize}",
        "task": {"name": "digits-mlp"},
        "rounds": 3,
        "clients": {"expected": 30},
        "round": {"fraction": 0.3, "min_clients": 1},
        "local": {"epochs": 2, "batch_size": 10, "lr": 0.05, "momentum": 0.5},
        # data-independent positions: a top-k tie that float rounding breaks differently would send
        # another coordinate and tell nothing about training; error feedback is still exercised
        "compression": "randomk(ratio=0.2) | ef",
        "simulation": {"partition": "dirichlet(alpha=0.5)", "actors": 0, "vectorize": vectorize, **sim},
    }
    return write_yaml(tmp_path / f"{vectorize}.yaml", data)


def test_simulation_vectorised_matches_sequential(tmp_path: Path) -> None:
    runs = {}
    for mode in ("on", "off"):
        sim, _ = build_simulation(load_fedsim_job(_job(tmp_path, mode)), quiet=True)
        sim.run()
        runs[mode] = sim
    on, off = runs["on"], runs["off"]
    assert on.pool.vectorized and not off.pool.vectorized
    for k, v in on.coord.params.items():
        torch.testing.assert_close(v, off.coord.params[k], rtol=1e-4, atol=1e-5)
    # error-feedback residuals, kept per client in the driver, agree as well
    for a, b in zip(on.clients.clients, off.clients.clients, strict=True):
        assert (a.ef is None) == (b.ef is None)
        if a.ef is not None:
            np.testing.assert_allclose(a.ef, b.ef, rtol=1e-4, atol=1e-5)
    assert [e["clients"] for e in on.coord.log] == [e["clients"] for e in off.coord.log]


def test_results_say_which_path_ran(tmp_path: Path) -> None:
    for mode, want in (("auto", True), ("off", False)):
        assert main(["fedsim", str(_job(tmp_path, mode)), "--runs-dir", str(tmp_path / "runs")]) == 0
        final = json.loads((tmp_path / "runs" / f"v-{mode}" / "results.json").read_text())["final"]
        assert final["vectorized"] is want
    # YAML reads a bare `off` as false; the switch takes it back as the word
    assert load_fedsim_job(_job(tmp_path, "auto"), ["simulation.vectorize=off"]).simulation.vectorize == "off"
