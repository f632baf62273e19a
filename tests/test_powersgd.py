"""`powersgd(...)` runs torch's own PowerSGD hook: in a real 2-process gloo group its
gradients equal those of torch's hook registered directly with the same settings, its byte
count equals what its all-reduces were handed, and its state survives a checkpoint."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from collective_count import counting
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from gradcomp.compression import SpecError, build
from gradcomp.worker import lowrank
from gradcomp.worker.hook import CompressionState, compression_hook
from gradcomp.worker.local_group import spawn_gloo_ranks

WORLD = 2
STEPS = 5
SPEC = "powersgd(rank=2, start_iter=2)"
# Linear(32 -> 64): weight 64x32 -> P 64x2, Q 32x2; Linear(64 -> 10): weight 10x64 -> P 10x2,
# Q 64x2; both worth compressing at min_rate 2. The biases (64 + 10) go uncompressed.
DENSE_NUMEL = 64 * 32 + 64 + 10 * 64 + 10
COMPRESSED_NUMEL = (64 + 32) * 2 + (10 + 64) * 2 + 64 + 10


class Net(nn.Module):
    """Two linear layers, parameters registered in gradient-ready order: DDP's first-step
    bucket then has the layout of its rebuilt one, so a resumed run can keep torch's
    per-bucket memory (with another order gradcomp drops it for that step; see hook.py)."""

    def __init__(self) -> None:
        super().__init__()
        first, second = nn.Linear(32, 64), nn.Linear(64, 10)
        self.b2, self.w2 = second.bias, second.weight
        self.b1, self.w1 = first.bias, first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.relu(nn.functional.linear(x, self.w1, self.b1)), self.w2, self.b2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def _grads(ddp: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    ddp.zero_grad()
    nn.functional.cross_entropy(ddp(x), y).backward()
    return [p.grad.clone() for p in ddp.parameters()]


def _worker(rank: int, out_dir: str) -> None:
    ours = nn.parallel.DistributedDataParallel(_model())
    state = CompressionState.for_model(ours, SPEC)
    ours.register_comm_hook(state, compression_hook)
    theirs = nn.parallel.DistributedDataParallel(_model())
    reference = torch_powersgd.PowerSGDState(
        process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2, random_seed=0
    )
    theirs.register_comm_hook(reference, torch_powersgd.powerSGD_hook)
    out: dict[str, Any] = {"equal": [], "traffic": [], "counted": [], "dense": []}
    saved = None
    with counting() as count:
        for step in range(STEPS):
            x, y = _batch(rank, step)
            mine = _grads(ours, x, y)
            traffic = state.take_traffic()
            out["counted"].append(count.take())
            out["traffic"].append(dict(traffic.by_collective))
            out["dense"].append(traffic.dense_bytes)
            out["equal"].append(all(torch.equal(a, b) for a, b in zip(mine, _grads(theirs, x, y), strict=True)))
            count.take()  # the reference's own all-reduces
            if step == 2:
                saved = copy.deepcopy(state.state_dict())
    # Resume from the step-2 checkpoint in a fresh state and model: steps 3-4 repeat exactly.
    again = nn.parallel.DistributedDataParallel(_model())
    resumed = CompressionState.for_model(again, SPEC)
    resumed.load_state_dict(saved)  # type: ignore[arg-type]
    again.register_comm_hook(resumed, compression_hook)
    rerun = [_grads(again, *_batch(rank, step)) for step in (3, 4)]
    out["resumed_equal"] = [
        all(torch.equal(a, b) for a, b in zip(r, _grads_again, strict=True))
        for r, _grads_again in zip(rerun, _replay(rank), strict=True)
    ]
    out["error_feedback_kept"] = bool(state.lowrank.error_dict)  # type: ignore[union-attr]
    out["moved_layout_equal"] = _moved_layout(rank, saved)  # type: ignore[arg-type]
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def _replay(rank: int) -> list[list[torch.Tensor]]:
    """Steps 3 and 4 of an uninterrupted run with torch's hook (a second reference run)."""
    ddp = nn.parallel.DistributedDataParallel(_model())
    ddp.register_comm_hook(
        torch_powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2),
        torch_powersgd.powerSGD_hook,
    )
    grads = [_grads(ddp, *_batch(rank, step)) for step in range(STEPS)]
    return grads[3:]


def _moved_layout(rank: int, saved: dict[str, Any]) -> bool:
    """Restore into a model whose first DDP bucket has another layout (nn.Sequential's
    parameter order) under the same index: the step must equal torch's hook with the same
    iteration and RNG but no per-bucket memory, i.e. memory dropped, not misapplied."""
    torch.manual_seed(0)
    ours = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
    moved = CompressionState.for_model(ours, SPEC)
    moved.load_state_dict(saved)
    ours.register_comm_hook(moved, compression_hook)
    theirs = nn.parallel.DistributedDataParallel(copy.deepcopy(ours.module))
    fresh = torch_powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2)
    lowrank.load_state_dict(fresh, saved["powersgd"])
    lowrank.forget_bucket(fresh, 0)
    theirs.register_comm_hook(fresh, torch_powersgd.powerSGD_hook)
    x, y = _batch(rank, 3)
    return all(torch.equal(a, b) for a, b in zip(_grads(ours, x, y), _grads(theirs, x, y), strict=True))


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_worker, (tmp,), world=WORLD)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


def test_gradients_equal_torchs_own_hook(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["equal"] == [True] * STEPS
        assert r["error_feedback_kept"]


def test_bytes_match_the_all_reduces(ranks: list[dict[str, Any]]) -> None:
    dense = DENSE_NUMEL * 4
    want = [dense, dense] + [COMPRESSED_NUMEL * 4] * (STEPS - 2)  # two dense warm-up steps, then P, Q, biases
    for r in ranks:
        assert [c.get("allreduce") for c in r["counted"]] == want
        assert [t.get("allreduce") for t in r["traffic"]] == want
        assert all(set(c) == {"allreduce"} for c in r["counted"])
        assert r["dense"] == [dense] * STEPS


def test_checkpoint_resumes_exactly(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["resumed_equal"] == [True, True]


def test_a_new_bucket_layout_drops_that_buckets_memory(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["moved_layout_equal"]


def test_powersgd_spec_is_checked() -> None:
    assert build("powersgd(rank=4, warm_start=false)").lowrank.rank == 4  # type: ignore[union-attr]
    with pytest.raises(SpecError, match="must stand alone"):
        build("powersgd(rank=2) | ef")
    with pytest.raises(SpecError, match="must stand alone"):
        build("topk(0.01) | powersgd")
    with pytest.raises(SpecError, match="start_iter"):
        build("powersgd(start_iter=1)")
    with pytest.raises(SpecError, match="per-tensor"):
        build("powersgd").compress(torch.randn(10))


def test_train_and_fed_jobs_refuse_what_cannot_work() -> None:
    from pydantic import ValidationError

    from gradcomp.config.fed import FedJob
    from gradcomp.config.train import TrainJob

    TrainJob.model_validate({"name": "ok", "compression": "powersgd(rank=2)"})
    with pytest.raises(ValidationError, match="start_iter=12"):
        TrainJob.model_validate({"name": "x", "compression": "powersgd(start_iter=2)", "warmup_dense_steps": 10})
    with pytest.raises(ValidationError, match="without DDP"):
        TrainJob.model_validate(
            {"name": "x", "compression": "powersgd", "dp": {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}}
        )
    for spec in ("powersgd(rank=2)", "topk(0.01, share=leader) | ef"):
        with pytest.raises(ValidationError, match="only in data-parallel training"):
            FedJob.model_validate({"compression": spec})
