"""The DDP compression hook in real 2-process gloo groups, against references computed without DDP.

One spawn runs every scenario (process start-up dominates on a small machine); each rank
measures differences and writes them out, and the tests below assert on those numbers.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradcomp.worker.hook import CompressionState, compression_hook
from gradcomp.worker.local_group import spawn_gloo_ranks

WORLD = 2


class Reversed(nn.Module):
    """Layers used in the reverse of their registration order, so the gradient-ready order
    differs from DDP's initial bucket order and DDP rebuilds its buckets after step 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(torch.relu(self.b(torch.relu(self.c(x)))))))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def _scenario(rank: int, spec: str, steps: int, warmup: int = 0) -> dict[str, Any]:
    torch.manual_seed(0)
    module = Reversed()
    ref = copy.deepcopy(module)
    # ~one 16x16 layer per bucket at first; DDP's rebuilt first bucket (1 MiB cap) then takes all.
    ddp = nn.parallel.DistributedDataParallel(module, bucket_cap_mb=0.0012)
    state = CompressionState.for_model(ddp, spec, seed=0, warmup_steps=warmup)
    names = {id(p): n for n, p in module.named_parameters()}
    buckets: list[tuple[str, list[str], list[int], torch.Tensor]] = []
    sent: list[tuple[str, torch.Tensor, Any]] = []

    def spy(st, bucket):  # type: ignore[no-untyped-def]  # no annotations: DDP compares them to real types
        params = bucket.parameters()
        key = st.bucket_key(params, [p.numel() for p in params])
        buckets.append((key, [names[id(p)] for p in params], [p.numel() for p in params], bucket.buffer().clone()))
        return compression_hook(st, bucket)

    original = state.pipeline.compress

    def recording(tensor: torch.Tensor, key: str = "default", choose: Any = None) -> Any:
        payload = original(tensor, key=key, choose=choose)
        sent.append((key, payload.to_dense().clone(), payload))
        return payload

    state.pipeline.compress = recording  # type: ignore[method-assign]
    ddp.register_comm_hook(state, spy)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    out: dict[str, Any] = {
        "grad_vs_mean": [],
        "buffer_vs_local": [],
        "ef_telescope": [],
        "keys": [],
        "traffic": [],
        "bucket_sizes": [],
    }
    sum_in = {n: torch.zeros(p.numel()) for n, p in module.named_parameters()}
    sum_sent = {n: torch.zeros(p.numel()) for n, p in module.named_parameters()}
    same_indices = True
    for step in range(steps):
        x, y = _batch(rank, step)
        ref.load_state_dict(module.state_dict())
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        local = {n: p.grad.detach().reshape(-1).clone() for n, p in ref.named_parameters()}
        buckets.clear()
        sent.clear()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        out["keys"].append(sorted({b[0] for b in buckets}))
        out["traffic"].append(vars(state.take_traffic()))
        out["bucket_sizes"].append([sum(b[2]) for b in buckets])
        # The buffer DDP hands the hook is this rank's plain (non-DDP) gradient, per parameter.
        diff = 0.0
        contributed: dict[str, torch.Tensor] = {}
        for i, (_key, pnames, sizes, buf) in enumerate(buckets):
            at = 0
            decoded = sent[i][1] if sent else buf
            for name, size in zip(pnames, sizes, strict=True):
                diff = max(diff, float((buf[at : at + size] - local[name]).abs().max()))
                contributed[name] = decoded[at : at + size]
                sum_in[name] += local[name]
                sum_sent[name] += decoded[at : at + size]
                at += size
        out["buffer_vs_local"].append(diff)
        # Reference: mean over ranks of what each rank contributed (its decoded payload, or
        # its raw gradient on dense/warm-up steps).
        everyone: list[Any] = [None] * WORLD
        dist.all_gather_object(everyone, {k: v.tolist() for k, v in contributed.items()})
        if sent and sent[0][2].__class__.__name__ == "Sparse":
            idx: list[Any] = [None] * WORLD
            dist.all_gather_object(idx, [p.indices.tolist() for _, _, p in sent])
            same_indices = same_indices and idx[0] == idx[1]
        gdiff, exact = 0.0, True
        for name, p in module.named_parameters():
            mean = sum(torch.tensor(e[name]) for e in everyone) / WORLD
            got = p.grad.reshape(-1)
            gdiff = max(gdiff, float((got - mean).abs().max()))
            exact = exact and torch.equal(got, mean)
        out["grad_vs_mean"].append(gdiff)
        out.setdefault("exact", []).append(exact)
        # Error feedback telescopes: everything put in = everything sent + what is still held.
        if state.pipeline.ef and sent:
            tdiff = 0.0
            for key, pnames, sizes, _ in buckets:
                residual = state.pipeline.residual(key)
                at = 0
                for name, size in zip(pnames, sizes, strict=True):
                    held = residual[at : at + size] if residual is not None else 0
                    tdiff = max(tdiff, float((sum_in[name] - sum_sent[name] - held).abs().max()))
                    at += size
            out["ef_telescope"].append(tdiff)
        opt.step()
    out["same_indices"] = same_indices
    out["params_equal_across_ranks"] = _params_equal(module)
    return out


def _params_equal(module: nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    both = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(both, flat)
    return bool(torch.equal(both[0], both[1]))


SCENARIOS = {
    "dense": ("none", 3, 0),
    "topk_ef": ("topk(ratio=0.2) | ef", 5, 0),
    "rtopk_ef": ("rtopk(ratio=0.1, r=0.3) | ef", 4, 0),
    "randomk_ef": ("randomk(ratio=0.25, seed=1) | ef", 4, 0),
    "unit": ("unit", 2, 0),
    "qsgd_ef": ("qsgd(levels=15, bucket=64) | ef", 3, 0),
    "warmup": ("topk(ratio=0.1) | ef", 4, 2),
}


def _worker(rank: int, out_dir: str) -> None:
    results = {name: _scenario(rank, *args) for name, args in SCENARIOS.items()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_worker, (tmp,), world=WORLD)
        return json.loads(Path(tmp, "rank0.json").read_text()) | {
            "rank1": json.loads(Path(tmp, "rank1.json").read_text())
        }


def test_buffer_is_the_plain_local_gradient(results: dict[str, Any]) -> None:
    for name in SCENARIOS:
        assert max(results[name]["buffer_vs_local"]) == 0.0, name
        assert max(results["rank1"][name]["buffer_vs_local"]) == 0.0, name


def test_dense_equals_reference_mean_exactly(results: dict[str, Any]) -> None:
    assert all(results["dense"]["exact"])
    assert all(results["rank1"]["dense"]["exact"])
    assert all(t["bytes_sent"] == t["dense_bytes"] for t in results["dense"]["traffic"])


@pytest.mark.parametrize("name", ["topk_ef", "rtopk_ef", "randomk_ef", "unit", "qsgd_ef"])
def test_compressed_equals_mean_of_decoded_payloads(results: dict[str, Any], name: str) -> None:
    for r in (results[name], results["rank1"][name]):
        assert max(r["grad_vs_mean"]) < 1e-6, r["grad_vs_mean"]
        assert r["params_equal_across_ranks"]


def test_sparse_sends_fewer_bytes(results: dict[str, Any]) -> None:
    for name in ("topk_ef", "rtopk_ef", "randomk_ef"):
        for t in results[name]["traffic"]:
            assert t["bytes_sent"] < 0.6 * t["dense_bytes"], (name, t)


def test_shared_seed_randomk_picks_same_indices_on_all_ranks(results: dict[str, Any]) -> None:
    assert results["randomk_ef"]["same_indices"]
    assert not results["rtopk_ef"]["same_indices"]  # data-dependent and random: ranks differ


def test_buckets_are_rebuilt_and_error_feedback_survives(results: dict[str, Any]) -> None:
    r = results["topk_ef"]
    assert r["keys"][0] != r["keys"][1], "DDP did not rebuild its buckets; the test model no longer exercises it"
    assert r["keys"][1:] == [r["keys"][1]] * (len(r["keys"]) - 1)
    # EF: input = sent + held, per parameter, across the rebuild (no residual lost or doubled).
    assert len(r["ef_telescope"]) == 5
    assert max(r["ef_telescope"]) < 1e-5
    assert max(results["rank1"]["topk_ef"]["ef_telescope"]) < 1e-5
    assert max(results["rtopk_ef"]["ef_telescope"]) < 1e-5
    assert max(results["qsgd_ef"]["ef_telescope"]) < 1e-5


def test_qsgd_hands_its_levels_and_norms_to_the_all_gather(results: dict[str, Any]) -> None:
    """Per bucket of n values: n int8 levels and one float32 norm per 64, all-gathered."""
    for r in (results["qsgd_ef"], results["rank1"]["qsgd_ef"]):
        for t, sizes in zip(r["traffic"], r["bucket_sizes"], strict=True):
            expected = sum(n + 4 * -(-n // 64) for n in sizes)
            assert t["by_collective"] == {"allgather": expected} and t["bytes_sent"] == expected


def test_dense_warmup_then_compression(results: dict[str, Any]) -> None:
    r = results["warmup"]
    assert r["exact"][:2] == [True, True]
    assert [t["bytes_sent"] == t["dense_bytes"] for t in r["traffic"]] == [True, True, False, False]
    assert max(r["ef_telescope"]) < 1e-5
