"""Dataset files are untrusted input: never run code from them, refuse data that would score silently wrong."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bpfree.data import load_dataset
from bpfree.errors import DataError
from conftest import write_cifar, write_idx, write_mnist_like


class _Payload:
    """A pickle that creates ``marker`` when it is unpickled (as a real attack would run a command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tamper(root: Path, marker: Path) -> Path:
    write_cifar(root)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpfree.cli", *args], capture_output=True, text=True, timeout=120)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("verify", [True, False])
def test_tampered_cifar_batch_never_runs_code(tmp_path, verify):
    marker = tmp_path / "pwned"
    path = _tamper(tmp_path / "data", marker)
    expected = "failed integrity check" if verify else "not a CIFAR batch"
    with pytest.raises(DataError, match=expected) as info:
        load_dataset("cifar10", tmp_path / "data", verify_checksums=verify)
    assert str(path) in str(info.value) and "truncated" not in str(info.value)
    assert not marker.exists()


def test_tampered_cifar_batch_on_the_command_line_is_one_line(tmp_path):
    marker = tmp_path / "pwned"
    _tamper(tmp_path / "data", marker)
    for extra in ([], ["--set", "verify_checksums=false"]):
        proc = _cli("run", "-a", "bp", "-d", "cifar10", "--data-root", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "-q", *extra)
        line = _one_line(proc)
        assert "data_batch_1" in line and ("failed integrity check" in line or "not a CIFAR batch" in line)
        assert not marker.exists()
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_repacked_cifar_copy_is_read_with_the_switch_and_refused_without(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(DataError, match="failed integrity check.*verify_checksums=false"):
        load_dataset("cifar10", tmp_path)
    assert load_dataset("cifar10", tmp_path, verify_checksums=False).spec.n_test == 30


def test_cifar_batch_of_the_wrong_content_is_not_a_cifar_batch(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": np.zeros((3, 10), dtype=np.uint8), "labels": [0, 1, 2]}))
    with pytest.raises(DataError, match="test_batch is not a CIFAR batch"):
        load_dataset("cifar10", tmp_path, verify_checksums=False)


def _mnist_with(root: Path, **replace: np.ndarray) -> None:
    write_mnist_like(root, "MNIST", n_train=120, n_test=40)
    names = {"train_y": "train-labels-idx1-ubyte", "test_y": "t10k-labels-idx1-ubyte", "test_x": "t10k-images-idx3-ubyte", "train_x": "train-images-idx3-ubyte"}
    for key, array in replace.items():
        write_idx(root / "MNIST" / "raw" / names[key], array)


@pytest.mark.parametrize(
    "replace, needle",
    [
        ({"test_y": np.full(40, 12)}, "test labels range over [12, 12], expected class indices in [0, 10)"),
        ({"train_y": np.full(120, 200)}, "labels range over [200, 200]"),
        ({"test_x": np.zeros((40, 20, 20))}, "test images have shape (1, 20, 20), expected (1, 28, 28)"),
        ({"train_x": np.zeros((5, 28, 28)), "train_y": np.zeros(5)}, "too few for a training and a validation split"),
    ],
)
def test_data_that_would_score_silently_wrong_is_refused(tmp_path, replace, needle):
    _mnist_with(tmp_path, **replace)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_labels_fail_before_any_run_directory_exists(tmp_path):
    _mnist_with(tmp_path / "data", test_y=np.full(40, 12))
    proc = _cli("run", "-a", "bp", "-d", "mnist", "--data-root", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "-q")
    assert "expected class indices in [0, 10)" in _one_line(proc)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
