"""The lm and resnet tasks through every training path and verb, at their tiny sizes.

Per-example paths (DP-SGD, the vectorised cohort) are checked against a plain loop of
`loss.backward()` on the same model; the example job files in examples/ run through the same
library calls as their CLI verbs (the data-parallel loop on local gloo ranks instead of Ray).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from gradcomp.audit import AuditConfig, audit_specs
from gradcomp.config.train import DPConfig
from gradcomp.fedclient.data import ClientData
from gradcomp.fedclient.train import SGDConfig, train_one
from gradcomp.sim.cohort import CohortClient, CohortTrainer, why_not_vectorizable
from gradcomp.sim.run import simulate
from gradcomp.sim.setup import load_fedsim_job
from gradcomp.study.sweep import run_sweep
from gradcomp.tasks import load_task
from gradcomp.tasks.resnet import ResNet
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.launch import load_train_job
from gradcomp.worker.local_group import spawn_gloo_ranks
from gradcomp.worker.loop import Session, train_worker

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL_LM = ["task.args.max_bytes=30000", "epochs=1"]
SPECS = 'specs=[none, {name: topk+ef, spec: "topk(ratio=0.01) | ef"}]'
SMALL_RESNET = ["task.args.synthetic_examples=384", "task.args.width=8", "epochs=1"]


def _loop_clipped_mean(
    model: torch.nn.Module, task: Any, x: torch.Tensor, y: torch.Tensor, clip: float
) -> torch.Tensor:
    total = None
    for i in range(len(x)):
        model.zero_grad()
        task.objective.mean(model(x[i : i + 1]), y[i : i + 1]).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        flat = flat * min(1.0, clip / float(flat.norm()))
        total = flat if total is None else total + flat
    return total / len(x)


@pytest.mark.parametrize("name,args", [("lm", {"size": "tiny"}), ("resnet", {"synthetic_examples": 16, "width": 8})])
def test_dp_sgd_per_example_gradients_match_a_loop(name: str, args: dict) -> None:
    task = load_task(name, **args)
    torch.manual_seed(0)
    model = task.make_model()
    dp = ExampleDP(model, DPConfig(clip=0.1, noise_multiplier=0.0), world=1, split_noise=True, sample_rate=0.1,
                   expected_batch=3.0, noise_seed=0, objective=task.objective)  # fmt: skip
    x, y = task.train_set.gather(torch.arange(3))
    got, _ = dp.gradient(x, y)
    torch.testing.assert_close(got, _loop_clipped_mean(model, task, x, y, 0.1), rtol=1e-4, atol=1e-6)


def test_lm_cohort_trains_vectorised_like_one_client_at_a_time() -> None:
    task = load_task("lm", size="tiny")
    torch.manual_seed(0)
    model = task.make_model()
    assert why_not_vectorizable(model) is None and why_not_vectorizable(ResNet(8, 8)) is None
    assert "BatchNorm2d" in (why_not_vectorizable(ResNet(8, 8, norm="batch")) or "")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SGDConfig(epochs=1, batch_size=4, lr=0.5, momentum=0.0)
    shards = [torch.arange(0, 9), torch.arange(20, 24), torch.arange(40, 41)]
    clients = [CohortClient(s.numpy(), seed) for seed, s in enumerate(shards)]
    got = CohortTrainer(model, task.train_set, cfg, task.objective).train(start, clients)
    for c, trained in zip(clients, got, strict=True):
        model.load_state_dict(start)
        want, loss, steps = train_one(model, ClientData(task.train_set, torch.from_numpy(c.indices)), cfg, c.seed,
                                      task.objective)  # fmt: skip
        assert trained.steps == steps and trained.train_loss == pytest.approx(loss, rel=1e-4)
        for k, v in trained.params.items():
            torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5)


def _collector(events: list[dict]) -> Any:
    return lambda e: events.extend(e["events"])


def _train_rank(rank: int, jobs: dict[str, Any], out: str) -> None:
    results = {}
    for name, job in jobs.items():
        events: list[dict] = []
        progress = _collector(events)
        train_worker(job, Session(rank, 2, torch.device("cpu"), lambda m, d: None, progress=progress))
        results[name] = [e for e in events if e["type"] == "epoch"]
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def test_example_train_jobs_run_on_gloo_ranks() -> None:
    lm, resnet = str(EXAMPLES / "lm-train.yaml"), str(EXAMPLES / "resnet-train.yaml")
    # DP-SGD charges the accountant every step (seconds each here): a few steps only
    dp = ["task.args.max_bytes=15000", "epochs=1", "compression=none", "dp={clip: 1.0, noise_multiplier: 0.5}"]
    batchnorm = [*SMALL_RESNET, "task.args.norm=batch", "compression=topk(ratio=0.05) | ef"]
    jobs = {
        "lm-topk": load_train_job(lm, SMALL_LM),
        "lm-dp": load_train_job(lm, dp),
        "resnet-powersgd": load_train_job(resnet, SMALL_RESNET),
        "resnet-batchnorm": load_train_job(resnet, batchnorm),
    }
    for job in jobs.values():
        job.checkpoint.every_epochs = 0
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_train_rank, (jobs, str(Path(tmp, "out.json"))), world=2)
        runs = json.loads(Path(tmp, "out.json").read_text())
    lm = runs["lm-topk"][-1]
    assert lm["test_bits_per_byte"] == pytest.approx(lm["test_loss"] / 0.6931471805599453)
    assert lm["compression_ratio"] > 40 and lm["test_loss"] < 5.5  # below a uniform guess over 256 bytes
    assert runs["lm-dp"][-1]["epsilon"] > 0 and "test_perplexity" in runs["lm-dp"][-1]
    for name in ("resnet-powersgd", "resnet-batchnorm"):
        assert runs[name][-1]["compression_ratio"] > 2 and 0 <= runs[name][-1]["test_accuracy"] <= 1


def test_example_fedsim_trains_on_the_natural_partition(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = load_fedsim_job(EXAMPLES / "lm-fedsim.yaml", ["rounds=2"])
    assert simulate(job, tmp_path, show=True) == 0
    assert "partition natural: 8 clients" in capsys.readouterr().out
    rec = json.loads((tmp_path / "lm-fedsim" / "results.json").read_text())
    assert rec["final"]["vectorized"] is True and rec["final"]["test_bits_per_byte"] > 0
    task = load_task("lm", size="tiny")
    assert rec["task"]["corpus_digest"] == task.info["corpus_digest"] and rec["task"]["parameters"] > 0


def test_example_sweep_runs_every_cell(tmp_path: Path) -> None:
    overrides = ["set.rounds=1", "set.clients.expected=4", SPECS, "leakage={victims: 4}"]
    args = argparse.Namespace(
        sweep=str(EXAMPLES / "sweep-lm.yaml"), address=None, check=False, runs_dir=str(tmp_path), overrides=overrides
    )
    assert run_sweep(args) == 0
    report = (tmp_path / "lm-study" / "results.csv").read_text().splitlines()
    assert len(report) == 1 + 4  # 2 specs x 2 privacy settings
    assert "not judged (tokens P 1.00 / R 1.00" in (tmp_path / "lm-study" / "report.md").read_text()


def test_audit_recovers_the_token_set_and_dp_hides_it() -> None:
    config = AuditConfig(task="lm", task_args={"size": "tiny"}, batch_sizes=(1, 4), victims=8)
    plain, sparse, noisy = (
        a.entry for a in audit_specs(["none", "topk(ratio=0.01)", "dp(clip=1.0, sigma=1.0)"], config)
    )
    assert plain["verdict"] == "not judged" and plain["reidentification"] is None
    assert plain["token_recovery"]["precision"] == 1.0 and plain["token_recovery"]["recall"] == 1.0
    assert not plain["attacks"]["analytic"]["applicable"]
    assert sparse["token_recovery"]["precision"] > 0.9  # the embedding rows are the gradient's largest entries
    for figures in noisy["token_recovery"]["by_batch_size"].values():
        assert figures["precision"] < figures["base_rate"] + 0.15  # little better than naming every token


def test_audit_attacks_the_resnet_images() -> None:
    config = AuditConfig(task="resnet", task_args={"synthetic_examples": 32, "width": 4}, batch_sizes=(1,), victims=2,
                         iterations=2)  # fmt: skip
    (entry,) = (a.entry for a in audit_specs(["none"], config))
    assert entry["verdict"] in ("leaks", "resists") and "token_recovery" not in entry
    assert entry["attacks"]["cosine-tv"]["by_batch_size"]["1"]["psnr_db"] is not None


RESNET_FED = [
    "rounds=1",
    "task={name: resnet, args: {synthetic_examples: 256, width: 8}}",
    "clients.expected=4",
    "round.min_clients=1",
    "simulation.partition=iid",
    "simulation.dropout=0",
    "simulation.stragglers.fraction=0",
]


@pytest.mark.server
@pytest.mark.parametrize(
    ("example", "overrides"), [("lm-fedsim.yaml", ["rounds=1"]), ("fedsim-digits.yaml", RESNET_FED)]
)
def test_the_workloads_run_over_the_real_grpc_service(tmp_path: Path, example: str, overrides: list[str]) -> None:
    """The coordinator service (what `gradcomp serve` runs) on 127.0.0.1 serves the new tasks' models in
    chunks and accepts their updates: every update trained is accepted."""
    job = load_fedsim_job(EXAMPLES / example, [*overrides, "simulation.grpc=true", "simulation.actors=0"])
    assert simulate(job, tmp_path, show=False) == 0
    final = json.loads((tmp_path / job.name / "results.json").read_text())["final"]
    assert final["transport"] == "grpc" and final["updates_accepted"] == final["updates_trained"] > 0
