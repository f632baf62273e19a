"""Image data for the ResNet task: CIFAR-10 and FEMNIST from a directory the user gives, or synthetic.

Nothing is downloaded. CIFAR-10 is read from the python-pickle batches its authors (and torchvision)
distribute (`data_batch_1`..`data_batch_5`, `test_batch`: dicts with b'data' [N, 3072] uint8 and
b'labels'), through an unpickler that builds only numpy arrays and plain values, so a planted file
cannot run code. FEMNIST is read from LEAF's JSON (`train/*.json`, `test/*.json`, each
{"users", "num_samples", "user_data": {user: {"x": [[784 floats in 0..1]], "y": [...]}}}), and its
writers are the natural federated clients. Images stay uint8 in memory (a quarter of float32) and
are scaled and normalised per batch.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gradcomp.tasks.base import TaskError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how a protocol-2 pickle written by Python 3 spells bytes
}


class ImageSet(Dataset):
    """uint8 images [N, C, H, W] and int64 labels; items and batches come out as normalised float32."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("ImageSet takes uint8 images [N, C, H, W] and one label each")
        self.images, self.labels = images, labels.to(torch.int64)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.gather(torch.tensor([int(i)]))
        return x[0], y[0]

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images and labels of the examples at `indices`."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return (self.images[idx].float() - self._mean) / self._std, self.labels[idx]


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds numpy arrays only")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as err:
        raise TaskError(f"cifar10: {path} is not a CIFAR-10 python batch: {err}") from err
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise TaskError(f"cifar10: {path}: expected b'data' [N, 3072] and N labels, got {data.shape}, {len(labels)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise TaskError(f"cifar10: {path}: labels outside 0..9")
    return data, labels


def load_cifar10(data_dir: str | Path) -> tuple[ImageSet, ImageSet]:
    """(train, test) from `data_dir` or its `cifar-10-batches-py/` subdirectory."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    base = Path(data_dir).expanduser()
    for root in (base, base / "cifar-10-batches-py"):
        if all((root / n).is_file() for n in names):
            break
    else:
        raise TaskError(
            f"cifar10: {base} does not hold the CIFAR-10 python batches ({', '.join(names)}); "
            "gradcomp downloads nothing: put the 'python version' of CIFAR-10 there, or use dataset: synthetic"
        )
    parts = [_read_batch(root / n) for n in names]
    x_tr = np.concatenate([p[0] for p in parts[:5]])
    y_tr = np.concatenate([p[1] for p in parts[:5]])

    def as_set(x: np.ndarray, y: np.ndarray) -> ImageSet:
        return ImageSet(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y), CIFAR_MEAN, CIFAR_STD)

    return as_set(x_tr, y_tr), as_set(*parts[5])


def _read_leaf(files: list[Path], max_users: int | None) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    users: list[str] = []
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for path in files:
        try:
            doc = json.loads(path.read_text())
            for user in doc["users"]:
                if max_users is not None and len(users) >= max_users:
                    return users, xs, ys
                entry = doc["user_data"][user]
                x = np.asarray(entry["x"], dtype=np.float32).reshape(-1, 28, 28)
                y = np.asarray(entry["y"], dtype=np.int64)
                if len(x) != len(y) or (y.size and (y.min() < 0 or y.max() > 61)):
                    raise ValueError(f"user {user!r}: {len(x)} images, {len(y)} labels (0..61 expected)")
                users.append(user)
                xs.append(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))
                ys.append(y)
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise TaskError(f"femnist: {path} is not a LEAF FEMNIST file: {err}") from err
    return users, xs, ys


def load_femnist(data_dir: str | Path, max_users: int | None = None) -> tuple[ImageSet, ImageSet, torch.Tensor]:
    """(train, test, writer index of each training example) from LEAF's `train/` and `test/` JSON files.

    A writer's test images are kept only if its training images are (`max_users` caps the writers)."""
    base = Path(data_dir).expanduser()
    train_files, test_files = sorted((base / "train").glob("*.json")), sorted((base / "test").glob("*.json"))
    if not train_files or not test_files:
        raise TaskError(
            f"femnist: {base} needs LEAF's train/*.json and test/*.json (LEAF's femnist preprocessing output); "
            "gradcomp downloads nothing"
        )
    users, xs, ys = _read_leaf(train_files, max_users)
    t_users, t_xs, t_ys = _read_leaf(test_files, None)
    keep = set(users)
    t_xs = [x for u, x in zip(t_users, t_xs, strict=True) if u in keep]
    t_ys = [y for u, y in zip(t_users, t_ys, strict=True) if u in keep]
    if not users or not t_xs:
        raise TaskError(f"femnist: {base} holds no writer with both training and test images")
    writers = torch.from_numpy(np.concatenate([np.full(len(y), i, dtype=np.int64) for i, y in enumerate(ys)]))

    def as_set(x: list[np.ndarray], y: list[np.ndarray]) -> ImageSet:
        images = torch.from_numpy(np.concatenate(x))[:, None]
        return ImageSet(images, torch.from_numpy(np.concatenate(y)), (0.5,), (0.5,))

    return as_set(xs, ys), as_set(t_xs, t_ys), writers


def synthetic_cifar(examples: int = 2048, num_classes: int = 10, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """CIFAR-shaped uint8 images: a fixed random template per class plus noise (learnable, not trivial)."""
    gen = torch.Generator().manual_seed(seed)
    n_test = max(examples // 5, 1)
    templates = torch.randn(num_classes, 3, 32, 32, generator=gen)
    labels = torch.randint(0, num_classes, (examples + n_test,), generator=gen)
    noise = torch.randn(examples + n_test, 3, 32, 32, generator=gen)
    images = (128 + 25 * templates[labels] + 50 * noise).round().clamp(0, 255).to(torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return ImageSet(images[:examples], labels[:examples], mean, std), ImageSet(
        images[examples:], labels[examples:], mean, std
    )
