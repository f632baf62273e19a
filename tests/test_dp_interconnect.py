"""What a DP-SGD worker hands the collectives, against an observer of its interconnect messages
(the adversary `epsilon_rank_message` is stated for): its noised gradient, and nothing else
computed from its raw batch. Its un-noised loss sum and drawn batch size used to be all-reduced
every epoch for the epoch's `train_loss` even with `dp.unprotected_metrics: false` (rank 0 sent a
loss sum of 1541.76 over 692 examples); they cross only when the job lets them out.

Real gloo ranks; `collective_count.counting(keep=True)` keeps a copy of every tensor a rank hands
to all-reduce, broadcast and all-gather, and a spy on `ExampleDP.gradient` records the rank's true
per-batch loss sums and batch sizes to look for."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from collective_count import counting

from gradcomp.config.train import TrainJob
from gradcomp.worker.dp import ExampleDP
from gradcomp.worker.local_group import spawn_gloo_ranks
from gradcomp.worker.loop import Session, train_worker

TASK = {"name": "synthetic", "args": {"num_params": 200, "num_examples": 80, "input_dim": 8}}


def _job(unprotected: bool) -> TrainJob:
    return TrainJob.model_validate(
        {
            "name": "wire",
            "task": TASK,
            "epochs": 1,
            "batch_size": 4,
            "compression": "none",
            "checkpoint": {"every_epochs": 0},
            "dp": {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, "unprotected_metrics": unprotected},
        }
    )


def _observe(rank: int, unprotected: bool) -> dict[str, Any]:
    """One epoch on this rank: its true loss sum and drawn examples, and every value it handed over."""
    batches: list[tuple[int, float]] = []
    gradient = ExampleDP.gradient

    def spy(self: ExampleDP, x: torch.Tensor, y: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = gradient(self, x, y, *args, **kwargs)
        batches.append((len(y), float(out[1])))
        return out

    ExampleDP.gradient = spy  # type: ignore[method-assign]
    try:
        with counting(keep=True) as count:
            train_worker(_job(unprotected), Session(rank, 2, torch.device("cpu"), lambda m, w: None))
    finally:
        ExampleDP.gradient = gradient  # type: ignore[method-assign]
    return {
        "examples": sum(n for n, _ in batches),
        "loss_sum": sum(loss for _, loss in batches),
        "sent": [(kind, t.double().reshape(-1).tolist()) for kind, t in count.sent],
    }


def _worker(rank: int, out_dir: str) -> None:
    out = {str(flag): _observe(rank, flag) for flag in (False, True)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def observed() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_worker, (tmp,), world=2)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]


def _carries(run: dict[str, Any]) -> tuple[bool, bool]:
    """Whether any value handed over equals the rank's drawn example count / its loss sum."""
    values = [v for _, tensor in run["sent"] for v in tensor]
    examples = any(v == run["examples"] for v in values)
    loss = any(math.isclose(v, run["loss_sum"], rel_tol=1e-6) for v in values)
    return examples, loss


@pytest.mark.parametrize("rank", [0, 1])
def test_a_dp_rank_hands_the_collectives_no_unnoised_loss_or_batch_size(observed: list, rank: int) -> None:
    run = observed[rank]["False"]
    # Something to find: a whole count and a loss sum are unlike any noised gradient value. The count is a
    # Poisson draw from a secret stream, so only its being positive is certain.
    assert run["examples"] >= 1 and run["loss_sum"] > 0.0
    assert _carries(run) == (False, False)


@pytest.mark.parametrize("rank", [0, 1])
def test_with_unprotected_metrics_they_cross_as_documented(observed: list, rank: int) -> None:
    """The same search finds them when the job lets them out: the check above can fail."""
    assert _carries(observed[rank]["True"]) == (True, True)
