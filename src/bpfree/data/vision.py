"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 read by torchvision, then held as tensors.

Splits follow the prior study (Spyra & Dzwinel, arXiv 2511.01061): MNIST keeps its fixed last
sixth (10k of 60k) as validation; the others hold out ``val_fraction`` of the training set. Unlike
the prior study, the held-out part is drawn with a fixed generator, not the run seed, so seeds and
tuning trials share one validation set. Test sets are the official ones.
"""

from __future__ import annotations

import os
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


def _torchvision_class(name: str):
    from torchvision import datasets

    if name in ("cifar10", "cifar100"):
        base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

        class LocalCIFAR(base):  # type: ignore[misc, valid-type]
            """torchvision's CIFAR reader with md5 checks off: a present file is read, and its parse is the check.

            torchvision compares md5 sums of the official files; a complete local copy that was
            re-packed (or a small fixture) would be refused as "not found or corrupted".
            """

            train_list = [(filename, None) for filename, _ in base.train_list]
            test_list = [(filename, None) for filename, _ in base.test_list]
            meta = {**base.meta, "md5": None}

        return LocalCIFAR
    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]


def _expected_files(name: str, root: Path) -> str:
    if name in ("mnist", "fashion_mnist"):
        folder = "MNIST" if name == "mnist" else "FashionMNIST"
        return f"{root / folder / 'raw'}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte"
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    return str(root / folder) + ("/{data_batch_1..5,test_batch,batches.meta}" if name == "cifar10" else "/{train,test,meta}")


def _read(name: str, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cls = _torchvision_class(name)
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            raise DataError(
                f"dataset {name}: not found under {root} (expected {_expected_files(name, root)}); "
                f"pass --download on a machine with internet, or --data-root pointing at an existing copy"
            ) from None
        raise DataError(f"dataset {name}: cannot read files under {root}: {exc}") from None
    except (OSError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        if download and isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise DataError(f"dataset {name}: download failed ({exc}); supply the files with --data-root") from None
        raise DataError(
            f"dataset {name}: files under {root} are truncated or malformed ({type(exc).__name__}: {exc}); "
            f"replace them with a complete copy"
        ) from None
    except Exception as exc:  # pickle/unpickling errors come in many types
        raise DataError(f"dataset {name}: files under {root} are unreadable ({type(exc).__name__}: {exc})") from None
    data = ds.data
    images = torch.as_tensor(np.asarray(data))
    if images.ndim == 3:  # MNIST-like: N×H×W
        images = images.unsqueeze(1)
    else:  # CIFAR: N×H×W×C
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"dataset {name}: {images.shape[0]} images but {labels.shape[0]} labels under {root}")
    return images.contiguous(), labels


def _normalise(name: str, images: torch.Tensor) -> torch.Tensor:
    mean, std = NORMALISATION[name]
    x = images.float() / 255.0
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def load_vision(name: str, data_root: Path | None, download: bool, val_fraction: float) -> Splits:
    root = Path(data_root) if data_root is not None else DEFAULT_ROOT
    train_images, train_labels = _read(name, root, train=True, download=download)
    test_images, test_labels = _read(name, root, train=False, download=download)
    n = train_images.shape[0]
    if name == "mnist":
        n_val = n // 6  # the last 10k of 60k
        train_idx, val_idx = torch.arange(n - n_val), torch.arange(n - n_val, n)
    else:
        n_val = max(1, int(round(n * val_fraction)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        train_idx, val_idx = order[n_val:], order[:n_val]
    if len(train_idx) == 0:
        raise DataError(f"dataset {name}: only {n} training images under {root}; too few to split")
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
    register_dataset(_name)(lambda root, download, val_fraction, _n=_name: load_vision(_n, root, download, val_fraction))  # type: ignore[misc]
