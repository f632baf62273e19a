"""Strategies with a client half: FedProx's proximal term and SCAFFOLD's control variates.

Each client step is checked against a reference written with torch.optim.SGD (the sequential
trainer and the vectorised cohort alike), and SCAFFOLD's whole protocol (served control variate,
client state, control deltas, server update) against the invariant it keeps under full
participation: the server's c is the mean of the clients' c_i after every round.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from gradcomp.config.fed import FedJob
from gradcomp.fedclient.config import BadTrainingConfig, LocalTrainingConfig
from gradcomp.fedclient.data import ClientData, dataset_view
from gradcomp.fedclient.policy import TaskRefused
from gradcomp.fedclient.runtime import ClientRuntime
from gradcomp.fedclient.train import SGDConfig, client_batches, train_one
from gradcomp.protocol.messages import training_config
from gradcomp.sim.cohort import CohortClient, CohortTrainer
from gradcomp.sim.setup import build_simulation, fedsim_job
from gradcomp.sim.state import unpack_shaped
from gradcomp.strategies import Correction, client_half
from gradcomp.strategies.scaffold import CONTROL, CONTROL_DELTA, ScaffoldClient
from gradcomp.tasks import load_task

TASK = load_task("digits-mlp", hidden=8)


def _start() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TASK.make_model().state_dict().items()}


def _reference(
    start: dict[str, torch.Tensor], data: ClientData, cfg: SGDConfig, seed: int, grad_term
) -> dict[str, torch.Tensor]:
    """Local SGD with torch.optim.SGD, `grad_term(name, param)` added to each parameter's gradient."""
    model = TASK.make_model()
    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    for batch in client_batches(data.num_examples, cfg, seed):
        x, y = data.batch(batch)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.grad += grad_term(name, p)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _corrections(start: dict[str, torch.Tensor]) -> dict[str, tuple[Correction, object]]:
    """FedProx and SCAFFOLD corrections, each with the gradient term it must add."""
    mu = 0.3
    prox = client_half("fedprox", {"mu": mu})
    gen = torch.Generator().manual_seed(1)
    served = {**start, **{CONTROL + k: torch.randn(v.shape, generator=gen) for k, v in start.items()}}
    c_i = {k: torch.randn(v.shape, generator=gen) for k, v in start.items()}
    scaffold = client_half("scaffold", {})
    scaffold_anchors = scaffold.anchors(served, c_i)
    assert scaffold_anchors is not None
    return {
        "fedprox": (Correction(prox, prox.anchors(start, {})), lambda k, p: mu * (p - start[k])),
        "scaffold": (
            Correction(scaffold, scaffold_anchors),
            lambda k, p: served[CONTROL + k] - c_i[k],
        ),
    }


@pytest.mark.parametrize("name", ["fedprox", "scaffold"])
def test_client_step_matches_a_torch_optim_reference(name: str) -> None:
    start = _start()
    correction, term = _corrections(start)[name]
    cfg = SGDConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.5 if name == "fedprox" else 0.0)
    data = dataset_view(TASK.train_set).subset(np.arange(40, 110))
    model = TASK.make_model()
    model.load_state_dict(start)
    got, _, _ = train_one(model, data, cfg, 5, TASK.objective, correction)
    want = _reference(start, data, cfg, 5, term)
    plain = _reference(start, data, cfg, 5, lambda k, p: torch.zeros_like(p))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(want[k], plain[k]) for k in want)  # the term changed the training


@pytest.mark.parametrize("name", ["fedprox", "scaffold"])
def test_vectorised_cohort_applies_the_same_correction(name: str) -> None:
    start = _start()
    correction, _ = _corrections(start)[name]
    cfg = SGDConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.0)
    shards = [np.arange(0, 30), np.arange(30, 37), np.arange(60, 90)]
    clients = [CohortClient(s, seed, correction) for seed, s in enumerate(shards)]
    got = CohortTrainer(TASK.make_model(), TASK.train_set, cfg, TASK.objective, correction.half).train(start, clients)
    for c, trained in zip(clients, got, strict=True):
        model = TASK.make_model()
        model.load_state_dict(start)
        want, loss, steps = train_one(model, dataset_view(TASK.train_set).subset(c.indices), cfg, c.seed,
                                      TASK.objective, correction)  # fmt: skip
        assert trained.steps == steps and trained.train_loss == pytest.approx(loss, rel=1e-5)
        for k, v in trained.params.items():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)


def test_scaffold_client_state_and_control_delta_follow_option_two() -> None:
    start = _start()
    half = ScaffoldClient()
    served = {**start, **{CONTROL + k: torch.full_like(v, 0.5) for k, v in start.items()}}
    old = {k: torch.full_like(v, 0.25) for k, v in start.items()}
    local = {k: v - 0.3 for k, v in start.items()}
    new = half.after_round(served, local, steps=6, lr=0.1, state=old)
    for k in start:  # c_i+ = c_i - c + (x - y) / (K lr)
        torch.testing.assert_close(new[k], old[k] - 0.5 + 0.3 / (6 * 0.1))
    extras = half.update_extras(old, new)
    assert set(extras) == {CONTROL_DELTA + k for k in start}
    torch.testing.assert_close(extras[CONTROL_DELTA + "0.weight"], new["0.weight"] - old["0.weight"])


def test_a_client_refuses_settings_its_half_does_not_declare() -> None:
    base = LocalTrainingConfig(task="digits-mlp", epochs=1, batch_size=8, lr=0.1, momentum=0.0, spec="none", seed=0)
    assert dataclasses.replace(base, strategy="fedprox", strategy_settings={"mu": 0.5}).half().settings == {"mu": 0.5}
    for strategy, settings, match in [
        ("fedprox", {"mu": 1e9}, "outside"),
        ("fedprox", {"mu": float("nan")}, "outside"),
        ("fedprox", {"lambda": 1.0}, "not understood"),
        ("fedavg", {"mu": 0.1}, "not understood"),
        ("nosuch", {}, "unknown strategy"),
        ("fedprox", {f"s{i}": 0.0 for i in range(17)}, "at most 16"),
    ]:
        with pytest.raises(BadTrainingConfig, match=match):
            dataclasses.replace(base, strategy=strategy, strategy_settings=settings)


def test_a_local_dp_client_refuses_to_send_unnoised_control_variates() -> None:
    cfg = LocalTrainingConfig(task="digits-mlp", epochs=1, batch_size=8, lr=0.1, momentum=0.0,
                              spec="dp(clip=1.0, sigma=1.0)", seed=0, task_args={"hidden": 8},
                              strategy="scaffold")  # fmt: skip
    with pytest.raises(TaskRefused, match="does not noise"):
        ClientRuntime(cfg)


def _job(strategy: dict, vectorize: str = "auto", **extra) -> FedJob:
    data = {
        "name": "half",
        "task": {"name": "digits-mlp", "args": {"hidden": 8}},
        "clients": {"expected": 4},
        "rounds": 3,
        "round": {"fraction": 1.0},
        "local": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "strategy": strategy,
        "simulation": {"partition": "shards(k=2)", "actors": 0, "vectorize": vectorize},
    }
    return fedsim_job({**data, **extra})


def test_job_level_refusals_and_the_settings_clients_receive() -> None:
    cfg = training_config(_job({"name": "fedprox", "mu": 0.2}))
    assert cfg.strategy == "fedprox" and dict(cfg.strategy_settings) == {"mu": pytest.approx(0.2)}
    with pytest.raises(ValueError, match="without local DP"):
        _job({"name": "scaffold"}, privacy={"mode": "local", "clip": 1.0, "noise_multiplier": 1.0},
             compression="dp(clip=1.0, sigma=1.0)")  # fmt: skip
    with pytest.raises(ValueError, match="momentum"):
        _job({"name": "scaffold"}, local={"momentum": 0.5})


@pytest.mark.parametrize("vectorize", ["on", "off"])
def test_scaffold_end_to_end_keeps_c_the_mean_of_the_clients_states(vectorize: str) -> None:
    """Full participation: after every round c = (1/N) sum_i c_i (the server adds |S|/N mean dc_i)."""
    sim, _ = build_simulation(_job({"name": "scaffold"}, vectorize), quiet=True)
    like = sim.coord.params
    for _ in range(3):
        entry, _ = sim.run_round()
        assert entry is not None
        states = [unpack_shaped(c.strategy_state, like) for c in sim.clients.clients]
        for k, c in sim.coord.strategy.control.items():
            torch.testing.assert_close(c, torch.stack([s[k] for s in states]).mean(0), rtol=1e-4, atol=1e-5)
    assert any(float(c.abs().max()) > 0 for c in sim.coord.strategy.control.values())


def test_scaffold_over_the_real_grpc_service(tmp_path) -> None:
    """The coordinator serves the control variate beside the model and accepts the control deltas
    beside each update over gRPC; the run matches the in-process simulation."""
    import argparse
    import json

    import yaml

    from gradcomp.sim.run import run_fedsim

    finals = {}
    for grpc in (False, True):
        data = {
            "name": f"scaffold-{grpc}",
            "task": {"name": "digits-mlp", "args": {"hidden": 8}},
            "clients": {"expected": 4},
            "rounds": 2,
            "round": {"fraction": 1.0, "deadline_seconds": 30},
            "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
            "strategy": "scaffold",
            "simulation": {"partition": "shards(k=2)", "actors": 0, "grpc": grpc},
        }
        path = tmp_path / f"{grpc}.yaml"
        path.write_text(yaml.safe_dump(data))
        args = argparse.Namespace(job=str(path), overrides=[], runs_dir=str(tmp_path), check=False, progress=False)
        assert run_fedsim(args) == 0
        finals[grpc] = json.loads((tmp_path / data["name"] / "results.json").read_text())["final"]
    assert finals[True]["transport"] == "grpc" and finals[True]["updates_accepted"] == 8
    assert finals[True]["test_loss"] == pytest.approx(finals[False]["test_loss"], rel=1e-5)
    # the control deltas are counted: each update carries the model delta and as many control values
    assert finals[True]["uplink_bytes"] == 2 * finals[True]["dense_bytes"]
