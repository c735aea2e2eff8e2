"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 read from their official files, then held as tensors.

MNIST-like IDX files (raw arrays) are read by torchvision. CIFAR batches are pickles, so bpfree
reads them itself: each file's md5 is checked against the official sum (``verify_checksums``;
switch it off only for a re-packed copy you trust), and the pickle is parsed by an unpickler that
admits numpy arrays, lists, dicts, bytes, strings and numbers only, so a tampered file cannot run code.

Splits follow the prior study (Spyra & Dzwinel, arXiv 2511.01061): MNIST keeps its fixed last
sixth (10k of 60k) as validation; the others hold out ``val_fraction`` of the training set. Unlike
the prior study, the held-out part is drawn with a fixed generator, not the run seed, so seeds and
tuning trials share one validation set. Test sets are the official ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bpfree.data import DataSpec, Splits, register_dataset
from bpfree.errors import DataError

SPLIT_SEED = 20240501
DEFAULT_ROOT = Path(os.environ.get("BPFREE_DATA", "data"))

# (mean, std) per channel, as in the prior study's transforms.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


# Official md5 sums of the files bpfree reads (published with the archives, as torchvision lists them).
@dataclass(frozen=True)
class CifarFiles:
    folder: str
    archive: tuple[str, str, str]  # url, file name, md5
    labels: str  # the batch's label key
    train: tuple[tuple[str, str], ...]  # (file name, md5)
    test: tuple[tuple[str, str], ...]


CIFAR_FILES = {
    "cifar10": CifarFiles(
        folder="cifar-10-batches-py",
        archive=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        labels="labels",
        train=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    ),
    "cifar100": CifarFiles(
        folder="cifar-100-python",
        archive=("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
        labels="fine_labels",
        train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    ),
}
CHECKSUM_SWITCH = "--set verify_checksums=false"


def _numpy_global(name: str):
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return {"_reconstruct": multiarray._reconstruct, "_frombuffer": numeric._frombuffer}[name]  # type: ignore[attr-defined]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What ``_codecs.encode`` is used for in protocol-2 pickles of bytes: nothing else is admitted."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not part of a CIFAR batch")
    return text.encode("latin1")


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR batch and nothing else: numpy arrays and dtypes, lists, dicts, bytes, str, numbers.

    Every other global a pickle names (``os.system``, ``builtins.eval``...) is refused before it
    is looked up, so a tampered batch can never run code; it fails as "not a CIFAR batch".
    """

    _ARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")

    def find_class(self, module: str, name: str):
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module in self._ARRAY_MODULES and name in ("_reconstruct", "_frombuffer"):
            return _numpy_global(name)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never contains")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cifar_batch(name: str, path: Path, expected_md5: str, verify_checksums: bool) -> tuple[np.ndarray, np.ndarray]:
    if verify_checksums:
        actual = _md5(path)
        if actual != expected_md5:
            raise DataError(
                f"dataset {name}: {path} failed integrity check (md5 {actual}, official {expected_md5}); "
                f"replace it with the official file, or pass {CHECKSUM_SWITCH} for a re-packed copy you trust"
            )
    try:
        with open(path, "rb") as handle:
            batch = CifarUnpickler(handle, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file: one line
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"dataset {name}: {path} is not a CIFAR batch ({detail})") from None
    label_key = CIFAR_FILES[name].labels
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"dataset {name}: {path} is not a CIFAR batch (expected 'data': uint8 rows of 3072 bytes)")
    if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels) or len(labels) != data.shape[0]:
        raise DataError(f"dataset {name}: {path} is not a CIFAR batch (expected {label_key!r}: one integer per row)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _download_quietly(name: str, root: Path, fetch) -> None:
    """torchvision prints progress and every failed mirror; keep that off the terminal, fail in one line."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            fetch()
    except Exception as exc:  # noqa: BLE001 - network, HTTP and archive errors come in many types
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"dataset {name}: download failed ({detail}); supply the files with --data-root") from None


def _read_cifar(name: str, root: Path, train: bool, download: bool, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    files = CIFAR_FILES[name]
    folder = root / files.folder
    wanted = files.train if train else files.test
    if download and not all((folder / filename).is_file() for filename, _ in wanted):
        from torchvision.datasets.utils import download_and_extract_archive

        url, archive, archive_md5 = files.archive
        _download_quietly(name, root, lambda: download_and_extract_archive(url, str(root), filename=archive, md5=archive_md5))
    missing = [filename for filename, _ in wanted if not (folder / filename).is_file()]
    if missing:
        raise DataError(
            f"dataset {name}: not found under {root} (expected {_expected_files(name, root)}); "
            f"pass --download on a machine with internet, or --data-root pointing at an existing copy"
        )
    parts = [_read_cifar_batch(name, folder / filename, md5, verify_checksums) for filename, md5 in wanted]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images.contiguous(), labels


def _expected_files(name: str, root: Path) -> str:
    if name in ("mnist", "fashion_mnist"):
        folder = "MNIST" if name == "mnist" else "FashionMNIST"
        return f"{root / folder / 'raw'}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte"
    folder = CIFAR_FILES[name].folder
    return str(root / folder) + ("/{data_batch_1..5,test_batch}" if name == "cifar10" else "/{train,test}")


def _read_idx(name: str, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST and Fashion-MNIST: IDX files (raw arrays, no pickle), read by torchvision."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    if download:
        _download_quietly(name, root, lambda: cls(str(root), train=train, download=True))
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            raise DataError(
                f"dataset {name}: not found under {root} (expected {_expected_files(name, root)}); "
                f"pass --download on a machine with internet, or --data-root pointing at an existing copy"
            ) from None
        raise DataError(f"dataset {name}: cannot read files under {root}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged IDX file fails in many ways
        raise DataError(
            f"dataset {name}: files under {root} are truncated or malformed ({type(exc).__name__}: {exc}); "
            f"replace them with a complete copy"
        ) from None
    images = torch.as_tensor(np.asarray(ds.data)).unsqueeze(1)  # N×H×W -> N×1×H×W
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"dataset {name}: {images.shape[0]} images but {labels.shape[0]} labels under {root}")
    return images.contiguous(), labels


def _read(name: str, root: Path, train: bool, download: bool, verify_checksums: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if name in CIFAR_FILES:
        return _read_cifar(name, root, train, download, verify_checksums)
    return _read_idx(name, root, train, download)


def _normalise(name: str, images: torch.Tensor) -> torch.Tensor:
    mean, std = NORMALISATION[name]
    x = images.float() / 255.0
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def load_vision(name: str, data_root: Path | None, download: bool, val_fraction: float, verify_checksums: bool = True) -> Splits:
    root = Path(data_root).expanduser() if data_root is not None else DEFAULT_ROOT
    train_images, train_labels = _read(name, root, train=True, download=download, verify_checksums=verify_checksums)
    test_images, test_labels = _read(name, root, train=False, download=download, verify_checksums=verify_checksums)
    n = train_images.shape[0]
    if name == "mnist":
        n_val = n // 6  # the last 10k of 60k
        train_idx, val_idx = torch.arange(n - n_val), torch.arange(n - n_val, n)
    else:
        n_val = max(1, int(round(n * val_fraction)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        train_idx, val_idx = order[n_val:], order[:n_val]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"dataset {name}: only {n} training images under {root}; too few for a training and a validation split")
    x_train, x_test = _normalise(name, train_images), _normalise(name, test_images)
    classes = 100 if name == "cifar100" else 10
    spec = DataSpec(
        name,
        tuple(x_train.shape[1:]),  # type: ignore[arg-type]
        classes,
        len(train_idx),
        len(val_idx),
        x_test.shape[0],
        augment=name in ("cifar10", "cifar100"),
    )
    return Splits(
        spec,
        x_train[train_idx],
        train_labels[train_idx],
        x_train[val_idx],
        train_labels[val_idx],
        x_test,
        test_labels,
    )


for _name in NORMALISATION:
    register_dataset(_name)(
        lambda root, download, val_fraction, verify_checksums=True, _n=_name: load_vision(_n, root, download, val_fraction, verify_checksums)  # type: ignore[misc]
    )
