"""The collectives in a real 2-process gloo group: each result is the mean over ranks
of the decoded payloads (computed here, without any collective, from the same seeds)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from gradcomp.compression import Dense, Sparse, build
from gradcomp.worker.collectives import (
    allgather_mean,
    allreduce_mean,
    allreduce_values_mean,
    reduce_payload,
)
from gradcomp.worker.local_group import spawn_gloo_ranks

WORLD = 2
N = 1000
CASES = {
    "dense": "none",
    "topk": "topk(ratio=0.05)",
    "topk_fp16": "topk(ratio=0.05) | fp16",
    "rtopk": "rtopk(ratio=0.02, r=0.1)",
    "randomk": "randomk(ratio=0.05, seed=7)",
    "randomk_bf16": "randomk(ratio=0.05, seed=7) | bf16",
    "unit": "unit",
    "qsgd": "qsgd(levels=15, bucket=100)",
    "qsgd_ef": "qsgd(levels=3, bucket=64) | ef",
}


def _input(rank: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(rank + 11))


def _out() -> torch.Tensor:
    """Where a collective writes its mean: filled with NaN, so anything left unwritten shows."""
    return torch.full((N,), float("nan"))


def _payload(spec: str, rank: int):  # type: ignore[no-untyped-def]
    return build(spec, seed=rank).compress(_input(rank), key="t")


def _worker(rank: int, out_dir: str) -> None:
    out: dict[str, torch.Tensor] = {}
    for name, spec in CASES.items():
        pipe = build(spec, seed=rank)
        payload = pipe.compress(_input(rank), key="t")
        out[name] = reduce_payload(payload, _out(), pipe.shared_indices).wait()
    # The specific collectives, called directly.
    out["direct_dense"] = allreduce_mean(_input(rank).clone()).wait()
    sparse = _payload("topk(ratio=0.05)", rank)
    out["direct_gather"] = allgather_mean(sparse, _out()).wait()
    shared = _payload("randomk(ratio=0.05, seed=7)", rank)
    out["direct_shared"] = allreduce_values_mean(shared, _out()).wait()
    # Overlapping positions on both ranks add up (identical inputs -> identical top-k).
    same = Sparse(torch.arange(0, 50, dtype=torch.int32), torch.full((50,), float(rank + 1)), (N,), torch.float32)
    out["overlap"] = allgather_mean(same, _out()).wait()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def gathered() -> list[dict[str, torch.Tensor]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_worker, (tmp,), world=WORLD)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


def _reference(spec: str) -> torch.Tensor:
    return sum(_payload(spec, r).to_dense() for r in range(WORLD)) / WORLD  # type: ignore[return-value]


@pytest.mark.parametrize("name", sorted(CASES))
def test_result_is_mean_of_decoded_payloads(gathered: list[dict[str, torch.Tensor]], name: str) -> None:
    ref = _reference(CASES[name])
    # An all-reduce of bf16 values adds them in bf16 (as any low-precision all-reduce does):
    # one more rounding than the float32 reference. Gathers add in float32 after decoding.
    tol = {"rtol": 1e-2, "atol": 1e-2} if name == "randomk_bf16" else {"rtol": 1e-6, "atol": 1e-7}
    for out in gathered:
        assert out[name].shape == (N,)
        torch.testing.assert_close(out[name], ref, **tol)


def test_dense_mean_is_exact(gathered: list[dict[str, torch.Tensor]]) -> None:
    ref = (_input(0) + _input(1)) / 2
    for out in gathered:
        assert torch.equal(out["dense"], ref)
        assert torch.equal(out["direct_dense"], ref)


def test_direct_sparse_collectives(gathered: list[dict[str, torch.Tensor]]) -> None:
    for out in gathered:
        torch.testing.assert_close(out["direct_gather"], _reference("topk(ratio=0.05)"))
        torch.testing.assert_close(out["direct_shared"], _reference("randomk(ratio=0.05, seed=7)"))


def test_overlapping_indices_are_summed_then_averaged(gathered: list[dict[str, torch.Tensor]]) -> None:
    for out in gathered:
        assert torch.equal(out["overlap"][:50], torch.full((50,), 1.5))
        assert torch.count_nonzero(out["overlap"][50:]) == 0


def test_payload_kinds_match_the_collective() -> None:
    assert isinstance(_payload("none", 0), Dense)
    assert isinstance(_payload("rtopk(ratio=0.02, r=0.1)", 0), Sparse)
    assert build("randomk(ratio=0.05, seed=7)").shared_indices
    assert not build("rtopk(ratio=0.02, r=0.1)").shared_indices


def test_sent_bytes_counts_what_the_collective_ships() -> None:
    from gradcomp.compression import build
    from gradcomp.worker.collectives import sent_bytes

    x = torch.randn(10_000)
    sparse = build("topk(0.01)").compress(x)
    assert sent_bytes(sparse, shared_indices=False) == 100 * (4 + 4)  # int32 positions + fp32 values
    assert sent_bytes(build("randomk(0.01)").compress(x), shared_indices=True) == 100 * 4  # values only
    assert sent_bytes(build("fp16").compress(x), shared_indices=False) == 10_000 * 2
    assert sent_bytes(build("qsgd(bucket=1000)").compress(x), shared_indices=False) == 10_000 + 10 * 4  # int8 + norms
