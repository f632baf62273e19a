"""The ResNet task: the model's norms, CIFAR-10 and FEMNIST read from files in their real formats."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcomp.tasks import TaskError, load_task
from gradcomp.tasks.images import CIFAR_MEAN, load_cifar10
from gradcomp.tasks.resnet import ResNet


def _write_cifar(root: Path, per_batch: int = 6) -> dict[str, np.ndarray]:
    """CIFAR-10's python batches: pickled dicts with b'data' [N, 3072] uint8, b'labels' (a list)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = data
    return written


def _write_femnist(root: Path) -> None:
    """LEAF's femnist JSON: users, num_samples, user_data {user: {x: [[784 floats]], y: [...]}}."""
    rng = np.random.default_rng(1)
    for split, files in (("train", 2), ("test", 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for f in range(files):
            users = (
                [f"f{f}_{u}" for u in range(3)]
                if split == "train"
                else [f"f{g}_{u}" for g in range(2) for u in range(3)]
            )
            counts = [int(rng.integers(2, 5)) for _ in users]
            doc = {
                "users": users,
                "num_samples": counts,
                "user_data": {
                    u: {"x": rng.random((n, 784)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()}
                    for u, n in zip(users, counts, strict=True)
                },
            }
            (root / split / f"all_data_{f}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(doc))


def test_cifar10_batches_are_read_in_order_and_normalised(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    task = load_task("resnet", dataset="cifar10", data_dir=str(tmp_path), depth=8, width=8)
    assert len(task.train_set) == 30 and len(task.test_set) == 6 and task.num_classes == 10
    x, y = task.train_set[7]  # second batch, second row
    raw = torch.from_numpy(written["data_batch_2"][1].reshape(3, 32, 32)).float()
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0], (raw[0] - CIFAR_MEAN[0] * 255) / (0.2470 * 255), atol=1e-4)
    bx, by = task.train_set.gather(torch.tensor([7, 0]))
    assert torch.equal(bx[0], x) and int(by[0]) == int(y)
    assert task.make_model()(bx).shape == (2, 10)


def test_cifar10_refuses_missing_files_and_code_in_a_pickle(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not hold the CIFAR-10 python batches"):
        load_task("resnet", dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(TaskError, match="needs data_dir"):
        load_task("resnet", dataset="cifar10")
    _write_cifar(tmp_path)

    class Planted:
        def __reduce__(self):  # what a planted batch would run on load
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Planted(), b"labels": []}))
    with pytest.raises(TaskError, match="refusing to load"):
        load_cifar10(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_femnist_reads_leaf_json_with_writers_as_groups(tmp_path: Path) -> None:
    _write_femnist(tmp_path)
    task = load_task("resnet", dataset="femnist", data_dir=str(tmp_path), depth=8, width=8)
    assert task.num_classes == 62 and task.info["writers"] == 6
    assert task.groups is not None and task.groups.tolist() == sorted(task.groups.tolist())
    assert len(task.groups) == len(task.train_set) and len(task.test_set) > 0
    x, _ = task.train_set[0]
    assert x.shape == (1, 28, 28) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    capped = load_task("resnet", dataset="femnist", data_dir=str(tmp_path), max_users=2, depth=8, width=8)
    assert capped.info["writers"] == 2 and len(capped.test_set) < len(task.test_set)
    assert task.make_model()(torch.stack([x, x])).shape == (2, 62)
    with pytest.raises(TaskError, match="LEAF"):
        load_task("resnet", dataset="femnist", data_dir=str(tmp_path / "nothing"))


def test_resnet_norms_depths_and_synthetic_data() -> None:
    group = ResNet(depth=14, width=16)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in group.modules()) and not list(group.buffers())
    batch = ResNet(depth=8, width=16, norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in batch.modules())
    assert sum(p.numel() for p in ResNet(depth=20).parameters()) == pytest.approx(270_000, rel=0.05)
    with pytest.raises(TaskError, match="6n\\+2"):
        load_task("resnet", depth=10)
    task = load_task("resnet", synthetic_examples=64, depth=8, width=8)
    x, y = task.train_set.gather(torch.arange(64))
    assert x.shape == (64, 3, 32, 32) and y.max() < 10 and len(task.test_set) == 12
    # the classes differ in their images: the class means are far apart compared with one image's noise
    means = torch.stack([x[y == c].mean(0) for c in y.unique()])
    assert torch.cdist(means.flatten(1), means.flatten(1)).max() > 10
