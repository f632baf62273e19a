"""Leader mode (`share=leader`) and the byte accounting of every sparse mode, in a real
3-process gloo group.

Numbers are checked against a reference computed here without any collective: every rank's
gradient is derived from seeds, so the test replays each rank's error feedback, the rotating
leader's top-k and the mean at its positions. Bytes are checked against a count taken from
the collectives themselves (tests/collective_count.py).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from collective_count import counting
from torch import nn

from gradcomp.compression import build
from gradcomp.worker.hook import CompressionState, compression_hook
from gradcomp.worker.local_group import spawn_gloo_ranks

WORLD = 3
N = 1000
STEPS = 4
K = 50  # topk(ratio=0.05) of N


def _grad(rank: int, step: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(100 * step + rank))


def _direct(rank: int, spec: str) -> dict[str, Any]:
    """`reduce` called on a flat tensor (as the DP path does), STEPS rounds."""
    state = CompressionState(build(spec, seed=rank), {})
    out: dict[str, Any] = {"mean": [], "residual": [], "leader": [], "traffic": [], "counted": []}
    with counting() as count:
        for step in range(STEPS):
            out["leader"].append(state.leader_of(0))
            out["mean"].append(state.reduce(_grad(rank, step), "t").wait().clone())
            state.end_step()
            out["residual"].append(state.pipeline.residual("t").clone())
            traffic = state.take_traffic()
            out["traffic"].append(dict(traffic.by_collective) | {"total": traffic.bytes_sent})
            out["counted"].append(count.take())
    return out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _ddp(rank: int, spec: str) -> dict[str, Any]:
    """DDP end to end: gradients equal the mean of what every rank's payload decodes to."""
    torch.manual_seed(0)
    module = Net()
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(module))
    state = CompressionState.for_model(ddp, spec, seed=rank)
    sent: list[Any] = []
    original = state.pipeline.compress

    def recording(tensor: torch.Tensor, key: str = "default", choose: Any = None) -> Any:
        payload = original(tensor, key=key, choose=choose)
        sent.append(payload)
        return payload

    order: list[list[torch.Tensor]] = []

    def spy(st, bucket):  # type: ignore[no-untyped-def]  # no annotations: DDP compares them to real types
        order.append(bucket.parameters())
        return compression_hook(st, bucket)

    state.pipeline.compress = recording  # type: ignore[method-assign]
    ddp.register_comm_hook(state, spy)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out: dict[str, Any] = {"grad_vs_mean": [], "same_indices": True, "traffic": [], "counted": []}
    with counting() as count:
        for step in range(STEPS):
            g = torch.Generator().manual_seed(10 * step + rank)
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            sent.clear()
            order.clear()
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            traffic = state.take_traffic()
            out["traffic"].append(dict(traffic.by_collective))
            out["counted"].append(count.take())
            (payload,) = sent  # one bucket
            everyone: list[Any] = [None] * WORLD
            dist.all_gather_object(everyone, (payload.indices.tolist(), payload.to_dense().tolist()))
            out["same_indices"] &= all(e[0] == everyone[0][0] for e in everyone)
            mean = sum(torch.tensor(e[1]) for e in everyone) / WORLD
            got = torch.cat([p.grad.reshape(-1) for p in order[0]])  # the bucket's layout
            out["grad_vs_mean"].append(float((got - mean).abs().max()))
            opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(everyone, flat)
    out["params_equal"] = all(torch.equal(e, everyone[0]) for e in everyone)
    return out


DIRECT = {
    "leader_topk": "topk(ratio=0.05, share=leader) | ef",
    "gather_topk": "topk(ratio=0.05) | ef",
    "randomk": "randomk(ratio=0.05, seed=3) | ef",
    "leader_fp16": "topk(ratio=0.05, share=leader) | fp16 | ef",
}
DDP = {"leader_rtopk": "rtopk(ratio=0.05, r=0.2, share=leader) | ef"}


def _worker(rank: int, out_dir: str) -> None:
    results = {name: _direct(rank, spec) for name, spec in DIRECT.items()}
    results |= {name: _ddp(rank, spec) for name, spec in DDP.items()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_worker, (tmp,), world=WORLD)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


def _reference_leader() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Per step: the mean every rank must get; per rank and step: its residual afterwards."""
    residual = [torch.zeros(N) for _ in range(WORLD)]
    means, held = [], [[] for _ in range(WORLD)]  # type: ignore[var-annotated]
    for step in range(STEPS):
        corrected = [residual[r] + _grad(r, step) for r in range(WORLD)]
        leader = step % WORLD
        idx = torch.topk(corrected[leader].abs(), K).indices
        mean = torch.zeros(N)
        mean[idx] = sum(c[idx] / WORLD for c in corrected)  # type: ignore[assignment]
        means.append(mean)
        for r in range(WORLD):
            residual[r] = corrected[r].clone()
            residual[r][idx] = 0.0
            held[r].append(residual[r])
    return means, held


def test_leader_mode_equals_the_reference(ranks: list[dict[str, Any]]) -> None:
    means, held = _reference_leader()
    for rank, r in enumerate(ranks):
        out = r["leader_topk"]
        assert out["leader"] == [s % WORLD for s in range(STEPS)]  # rotates through every rank
        for step in range(STEPS):
            torch.testing.assert_close(out["mean"][step], means[step], rtol=1e-6, atol=1e-7)
            assert torch.equal(out["residual"][step], held[rank][step]), (rank, step)  # own residual, exactly


def test_every_rank_gets_the_same_result(ranks: list[dict[str, Any]]) -> None:
    for name in DIRECT:
        for step in range(STEPS):
            assert all(torch.equal(r[name]["mean"][step], ranks[0][name]["mean"][step]) for r in ranks), name


def test_leader_bytes_match_the_collectives(ranks: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(ranks):
        for step in range(STEPS):
            leads = step % WORLD == rank
            # values (fp32) all-reduced by everyone; k int32 positions broadcast by the leader only
            want = {"allreduce": K * 4} | ({"broadcast": K * 4} if leads else {})
            assert r["leader_topk"]["counted"][step] == want
            assert r["leader_topk"]["traffic"][step] == want | {"total": sum(want.values())}
            fp16 = {"allreduce": K * 2} | ({"broadcast": K * 4} if leads else {})
            assert r["leader_fp16"]["counted"][step] == fp16
            assert r["leader_fp16"]["traffic"][step] == fp16 | {"total": sum(fp16.values())}


def test_gather_and_randomk_bytes_match_the_collectives(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        for step in range(STEPS):
            assert r["gather_topk"]["counted"][step] == {"allgather": K * 8}  # int32 position + fp32 value
            assert r["gather_topk"]["traffic"][step] == {"allgather": K * 8, "total": K * 8}
            assert r["randomk"]["counted"][step] == {"allreduce": K * 4}  # values only: shared seed
            assert r["randomk"]["traffic"][step] == {"allreduce": K * 4, "total": K * 4}


def test_leader_rtopk_through_ddp(ranks: list[dict[str, Any]]) -> None:
    n = 16 * 32 + 32 + 32 * 4 + 4
    k = round(0.05 * n)
    for rank, r in enumerate(ranks):
        out = r["leader_rtopk"]
        assert out["same_indices"]
        assert max(out["grad_vs_mean"]) < 1e-6, out["grad_vs_mean"]
        assert out["params_equal"]
        for step in range(STEPS):
            want = {"allreduce": k * 4} | ({"broadcast": k * 4} if step % WORLD == rank else {})
            assert out["counted"][step] == out["traffic"][step] == want


def test_bytes_per_rank_do_not_grow_with_ranks() -> None:
    """The wire model behind the scaling benchmark: leader mode stays flat, all-gather grows."""
    from gradcomp.worker.collectives import wire_bytes

    k = 1000

    def leader(p: int) -> float:
        return wire_bytes({"allreduce": 4 * k, "broadcast": 4 * k / p}, p)

    def gather(p: int) -> float:
        return wire_bytes({"allgather": 8 * k}, p)

    assert leader(1024) < 3 * 4 * k  # bounded: 2 (P-1)/P for the values, (P-1)/P for positions
    assert gather(8) / gather(2) == 7
    assert leader(8) / leader(2) == pytest.approx(1.75)


def test_leader_spec_forms() -> None:
    from gradcomp.compression import SpecError

    assert build("rtopk(ratio=0.01, r=0.05, share=leader) | ef").leader
    assert build("rtopk(ratio=0.01, r=0.05, share=leader) | ef").shared_indices
    assert build([{"topk": {"ratio": 0.01, "share": "leader"}}, "ef"]).spec == "topk(ratio=0.01, share=leader) | ef"
    assert build("topk(0.01, share=gather)").spec == "topk(ratio=0.01)"  # the default stays out of the text
    assert not build("topk(0.01)").leader
    with pytest.raises(SpecError, match="share"):
        build("topk(0.01, share=ring)")
    # Without a collective a lone rank leads itself: same as plain topk.
    x = torch.randn(500)
    assert torch.equal(build("topk(0.1, share=leader)").compress(x).indices, build("topk(0.1)").compress(x).indices)
