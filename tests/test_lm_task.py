"""The language-model task: the standard-library corpus, its by-file split and digest, token windows, the GPT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad, vmap

from gradcomp.tasks import TaskError, load_task
from gradcomp.tasks.corpus import SEPARATOR, build_corpus, group_of, is_held_out, list_sources
from gradcomp.tasks.gpt import GPT, GPTConfig
from gradcomp.tasks.lm import SIZES
from gradcomp.tasks.tokens import TokenWindows


def _fake_stdlib(root: Path, files: int = 40) -> Path:
    for i in range(files):
        rel = f"pkg{i % 7}/mod{i}.py" if i % 3 else f"single{i}.py"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {i}\n" + "x = 1\n" * (20 + i))
    for rel in ("site-packages/torch/x.py", "test/test_x.py", "pkg1/tests/test_y.py", "empty.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("" if rel == "empty.py" else "third party or tests\n")
    return root


def test_corpus_excludes_third_party_and_tests_and_splits_by_file(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "a")
    files = list_sources(root, 10.0)
    rels = [f.rel for f in files]
    assert rels == sorted(rels) and len(rels) == 40
    assert not any(r.startswith(("site-packages", "test/")) or "/tests/" in r or r == "empty.py" for r in rels)
    assert {f.group for f in files} == {f"pkg{i}" for i in range(7)} | {f"single{i}" for i in range(0, 40, 3)}
    assert group_of("json/decoder.py") == "json" and group_of("abc.py") == "abc"
    # the split depends on the relative path only: a copy under another root splits the same way
    other = list_sources(_fake_stdlib(tmp_path / "b"), 10.0)
    assert [f.held_out for f in other] == [f.held_out for f in files]
    assert [f.held_out for f in files] == [is_held_out(r, 10.0) for r in rels]
    assert any(is_held_out(r, 50.0) for r in rels) and not all(is_held_out(r, 50.0) for r in rels)


def test_corpus_layout_windows_and_digest(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "a")
    corpus = build_corpus(root, test_percent=30.0)
    total = sum(f.size + 1 for f in list_sources(root, 30.0))
    assert corpus.data.dtype == torch.uint8 and corpus.data.numel() == total
    assert int((corpus.data == SEPARATOR).sum()) == corpus.info["corpus_files"] == 40
    assert corpus.info["corpus_train_bytes"] + corpus.info["corpus_test_bytes"] == total
    # segments tile the data, one (group, side) each, every held-out segment after every training one
    seg = corpus.segments
    assert seg[0, 0] == 0 and seg[-1, 1] == total and (seg[1:, 0] == seg[:-1, 1]).all()
    sides = seg[:, 3].tolist()
    assert sides == sorted(sides) and set(sides) == {0, 1}
    for held_out in (False, True):
        starts, groups = corpus.windows(8, held_out)
        assert len(starts) > 0
        for s, g in zip(starts.tolist(), groups.tolist(), strict=True):
            (row,) = [r for r in seg if r[0] <= s < r[1]]
            assert row[2] == g and row[3] == held_out and s + 9 <= row[1]  # inside one segment
    # the digest names the text: same files, same digest; one byte changed, another
    assert build_corpus(_fake_stdlib(tmp_path / "b"), test_percent=30.0).digest == corpus.digest
    (root / "pkg1" / "mod1.py").write_text("# module 1\n" + "x = 2\n" * 21)
    assert build_corpus(root, test_percent=30.0).digest != corpus.digest
    assert build_corpus(root, test_percent=20.0).digest != build_corpus(root, test_percent=30.0).digest


def test_corpus_cap_fills_each_split_share(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path / "a")
    capped = build_corpus(root, max_bytes=1500, test_percent=30.0)
    assert capped.info["corpus_train_bytes"] - capped.info["corpus_files"] <= 1050
    assert capped.info["corpus_test_bytes"] > 0 and capped.info["corpus_files"] < 40
    with pytest.raises(TaskError, match="split empty"):
        build_corpus(root, max_bytes=20, test_percent=30.0)


def test_token_windows_are_views_of_one_tensor() -> None:
    data = torch.arange(100, dtype=torch.uint8)
    ds = TokenWindows(data, torch.tensor([0, 10, 40, 80]), 8, torch.tensor([0, 0, 1, 2]))
    x, y = ds[2]
    assert x.tolist() == list(range(40, 48)) and y.tolist() == list(range(41, 49)) and x.dtype == torch.int64
    bx, by = ds.gather(torch.tensor([3, 0]))
    assert torch.equal(bx, torch.stack([ds[3][0], ds[0][0]])) and torch.equal(by[1], ds[0][1])
    sub = ds.subset(torch.tensor([1, 3]))
    assert sub.data.data_ptr() == data.data_ptr() and sub.groups.tolist() == [0, 2] and len(sub) == 2
    with pytest.raises(ValueError, match="past the end"):
        TokenWindows(data, torch.tensor([95]), 8)


def test_gpt_is_causal_tied_and_sized() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert not list(model.buffers()) and "head.weight" not in model.state_dict()
    x = torch.randint(0, 256, (2, 16))
    out = model(x)
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % 256
    out2 = model(x2)
    assert out.shape == (2, 16, 256)
    assert torch.allclose(out[:, :9], out2[:, :9], atol=1e-6) and not torch.allclose(out[:, 9:], out2[:, 9:])
    untied = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=False))
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 256 * 32
    small = load_task("lm", size="small", corpus="synthetic", synthetic_examples=64)
    assert 0.8e6 < small.info["parameters"] < 1.3e6
    assert 25e6 <= _params(SIZES["large"]) <= 100e6
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _params(fields: dict) -> int:
    d, layers, block = fields["n_embd"], fields["n_layer"], fields["block_size"]
    per_block = 12 * d * d + 13 * d  # qkv + proj + mlp weights and biases, two LayerNorms
    return 256 * d + block * d + layers * per_block + 2 * d


def test_per_example_gradients_under_vmap_match_one_at_a_time() -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16))
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = torch.randint(0, 256, (3, 8)), torch.randint(0, 256, (3, 8))

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p,), (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out.reshape(-1, 256), yi.reshape(-1))

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        model.zero_grad()
        loss({n: p for n, p in model.named_parameters()}, x[i], y[i]).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(batched[name][i], p.grad, atol=1e-6), name


def test_lm_task_records_its_corpus() -> None:
    task = load_task("lm", size="tiny")
    info = task.info
    assert len(info["corpus_digest"]) == 64 and info["corpus"] == "stdlib-py-v1"
    assert info["corpus_train_bytes"] + info["corpus_test_bytes"] <= SIZES["tiny"]["max_bytes"]
    assert task.groups is not None and len(task.groups) == len(task.train_set)
    assert int(task.groups.max()) + 1 <= info["corpus_groups"] and info["model"]["n_layer"] == 1
    assert load_task("lm", size="tiny").info["corpus_digest"] == info["corpus_digest"]
    assert load_task("lm", size="tiny", max_bytes=100_000).info["corpus_digest"] != info["corpus_digest"]
    x, y = task.train_set[0]
    assert x.shape == (32,) and torch.equal(x[1:], y[:-1])
    with pytest.raises(TaskError, match="unknown size"):
        load_task("lm", size="huge")
    with pytest.raises(TaskError, match="multiple of n_head"):
        load_task("lm", size="tiny", n_head=3)
