"""Shared test helpers: small datasets written in the real on-disk formats, quick configs."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

# Tests run on CPU whatever the machine has, so numbers are comparable and CI-stable; the GPU tests
# (`BPFREE_GPU_TESTS=1 pytest -m gpu`) keep the devices visible.
if os.environ.get("BPFREE_GPU_TESTS") != "1":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (the MNIST format): magic 0x0000 08 <ndim>, big-endian dims, raw uint8."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        handle.write(struct.pack(f">{array.ndim}I", *array.shape))
        handle.write(array.tobytes())


def write_mnist_like(root: Path, folder: str, n_train: int = 120, n_test: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, size=n_train, dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    test_y = rng.integers(0, 10, size=n_test, dtype=np.uint8)
    raw = root / folder / "raw"
    write_idx(raw / "train-images-idx3-ubyte", train_x)
    write_idx(raw / "train-labels-idx1-ubyte", train_y)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    return train_x, train_y


def write_cifar(root: Path, classes: int = 10, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> np.ndarray:
    """Write CIFAR-10 (5 data batches + test + meta) or CIFAR-100 (train + test + meta) pickles."""
    rng = np.random.default_rng(seed)
    label_key = "labels" if classes == 10 else "fine_labels"

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), label_key: rng.integers(0, classes, n).tolist()}

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        first = None
        for i in range(1, 6):
            b = batch(per_batch)
            first = b if first is None else first
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(b))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
        return first["data"]
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train = batch(per_batch * 5)
    (folder / "train").write_bytes(pickle.dumps(train))
    (folder / "test").write_bytes(pickle.dumps(batch(n_test)))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return train["data"]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, two OpenMP threads per process can stall badly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tmp_results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    return out
