"""Datasets as whole tensors resident on the training device, with a fixed train/val/test split.

Every loader returns normalised float32 tensors; batches are drawn by index on the device, so
the hot loop has no DataLoader, no worker processes and no host-device copies.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bpfree.data.augment import random_crop_flip
from bpfree.errors import DataError
from bpfree.registry import Registry


@dataclass(frozen=True)
class DataSpec:
    """Shape facts every model and algorithm needs."""

    name: str
    input_shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int
    n_train: int
    n_val: int
    n_test: int
    augment: bool  # random crop + flip on training batches (CIFAR)

    @property
    def input_dim(self) -> int:
        c, h, w = self.input_shape
        return c * h * w


@dataclass(frozen=True)
class Splits:
    """Train/val/test tensors (images N×C×H×W, normalised; labels int64)."""

    spec: DataSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device | str) -> Splits:
        move = {f: getattr(self, f).to(device) for f in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return replace(self, **move)

    def with_images(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> Splits:
        return replace(self, train_x=transform(self.train_x), val_x=transform(self.val_x), test_x=transform(self.test_x))

    @property
    def device(self) -> torch.device:
        return self.train_x.device


def train_batches(
    splits: Splits, batch_size: int, generator: torch.Generator, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled training batches, drawn by index on the data's device.

    The permutation and the augmentation draw from ``generator`` so the data order is a pure
    function of the seed. The last, smaller batch is kept so every sample is seen each epoch,
    unless ``drop_last`` (the prior study's loaders) and there is at least one full batch.
    """
    n = splits.train_x.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device)
    if order.device != splits.device:
        order = order.to(splits.device)
    for start in range(0, n - n % batch_size if drop_last and n >= batch_size else n, batch_size):
        index = order[start : start + batch_size]
        x = splits.train_x.index_select(0, index)
        if splits.spec.augment:
            x = random_crop_flip(x, generator)
        yield x, splits.train_y.index_select(0, index)


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return (n + batch_size - 1) // batch_size


# name -> loader(data_root, download, val_fraction[, verify_checksums=...]) returning CPU splits
DatasetLoader = Callable[..., Splits]
DATASETS: Registry[DatasetLoader] = Registry("dataset", plugin_group="bpfree.datasets")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register a loader under ``name`` (a name already taken is refused)."""
    return DATASETS.register(name)


def dataset_names() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str,
    data_root: Path | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    verify_checksums: bool = True,
) -> Splits:
    """Load a registered dataset onto the CPU (call ``.to(device)`` on the result), checked by ``validate_splits``.

    An unknown name raises a one-line ConfigError listing the registered datasets.
    """
    loader = DATASETS.get(name)
    if "verify_checksums" in inspect.signature(loader).parameters:
        splits = loader(data_root, download, val_fraction, verify_checksums=verify_checksums)
    else:  # a loader with nothing to verify (a plugin's own format)
        splits = loader(data_root, download, val_fraction)
    validate_splits(splits, f"dataset {name}" + (f" under {data_root}" if data_root is not None else ""))
    return splits


def validate_splits(splits: Splits, where: str) -> None:
    """Refuse data that would train or score silently wrong: every split non-empty, every image of
    one shape, every label an int64 class index in [0, num_classes), one label per image."""
    spec = splits.spec
    for split in ("train", "val", "test"):
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        if x.shape[0] == 0:
            raise DataError(f"{where}: the {split} split is empty; the dataset is too small for a {split} split")
        if tuple(x.shape[1:]) != tuple(spec.input_shape):
            raise DataError(
                f"{where}: {split} images have shape {tuple(x.shape[1:])}, expected {tuple(spec.input_shape)} like the training images"
            )
        if y.dtype != torch.int64 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{where}: {split} labels must be one int64 class index per image ({y.shape[0]} labels, {x.shape[0]} images)")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= spec.num_classes:
            raise DataError(f"{where}: {split} labels range over [{low}, {high}], expected class indices in [0, {spec.num_classes})")


# The built-in datasets (each module registers its loaders on import).
from bpfree.data import embedded, vision  # noqa: E402,F401
