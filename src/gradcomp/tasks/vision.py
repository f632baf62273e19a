"""The ResNet image task: a small ResNet on CIFAR-10, FEMNIST (from `data_dir`) or synthetic CIFAR-shaped data."""

from __future__ import annotations

from gradcomp.tasks.base import Task, TaskError
from gradcomp.tasks.images import load_cifar10, load_femnist, synthetic_cifar
from gradcomp.tasks.resnet import ResNet

DATASETS = ("synthetic", "cifar10", "femnist")


def resnet(
    dataset: str = "synthetic",
    data_dir: str | None = None,
    depth: int = 8,
    width: int = 16,
    norm: str = "group",
    max_users: int | None = None,
    synthetic_examples: int = 2048,
    seed: int = 0,
) -> Task:
    """ResNet-`depth` (6n+2) of base `width` channels; GroupNorm unless `norm: batch`.

    `dataset: femnist` makes each writer a natural federated client (`partition: natural`)."""
    if dataset not in DATASETS:
        raise TaskError(f"resnet: unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if dataset != "synthetic" and not data_dir:
        raise TaskError(f"resnet: dataset {dataset} needs data_dir (a directory holding its files)")
    groups = None
    if dataset == "cifar10":
        train, test = load_cifar10(str(data_dir))
        in_channels, classes = 3, 10
    elif dataset == "femnist":
        train, test, groups = load_femnist(str(data_dir), max_users)
        in_channels, classes = 1, 62
    else:
        train, test = synthetic_cifar(synthetic_examples, seed=seed)
        in_channels, classes = 3, 10

    def make_model() -> ResNet:
        return ResNet(depth, width, in_channels, classes, norm)

    try:
        params = sum(p.numel() for p in make_model().parameters())
    except ValueError as err:
        raise TaskError(f"resnet: {err}") from err
    info = {"dataset": dataset, "depth": depth, "width": width, "norm": norm, "parameters": params}
    if groups is not None:
        info["writers"] = int(groups.max()) + 1
    return Task(f"resnet{depth}-{dataset}", make_model, train, test, num_classes=classes, info=info, groups=groups)
