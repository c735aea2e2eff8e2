"""Dataset loaders on files written in the real on-disk formats, and tensor-side augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bpfree.data import load_dataset, train_batches
from bpfree.data.augment import random_crop_flip
from bpfree.data.vision import NORMALISATION
from bpfree.errors import DataError
from conftest import write_cifar, write_mnist_like


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_loader_reads_real_format(tmp_path, name, folder):
    train_x, train_y = write_mnist_like(tmp_path, folder, n_train=120, n_test=40)
    splits = load_dataset(name, tmp_path)
    spec = splits.spec
    assert spec.input_shape == (1, 28, 28) and spec.num_classes == 10 and not spec.augment
    assert spec.n_train + spec.n_val == 120 and spec.n_test == 40
    if name == "mnist":  # fixed split: the last sixth is validation, as 50k/10k on the real set
        assert spec.n_val == 20
        mean, std = NORMALISATION["mnist"]
        expected = (torch.from_numpy(train_x[:1].astype(np.float32)) / 255 - mean[0]) / std[0]
        assert torch.allclose(splits.train_x[0, 0], expected[0], atol=1e-5)
        assert torch.equal(splits.val_y, torch.from_numpy(train_y[100:].astype(np.int64)))
    else:
        assert spec.n_val == 12  # 10% held out
    assert splits.train_x.dtype == torch.float32 and splits.train_y.dtype == torch.int64


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickle_loader_reads_real_format(tmp_path, classes):
    first_batch = write_cifar(tmp_path, classes=classes, per_batch=20, n_test=30)
    name = "cifar10" if classes == 10 else "cifar100"
    splits = load_dataset(name, tmp_path, val_fraction=0.1, verify_checksums=False)
    spec = splits.spec
    assert spec.input_shape == (3, 32, 32) and spec.num_classes == classes and spec.augment
    assert (spec.n_train, spec.n_val, spec.n_test) == (90, 10, 30)
    # Pixel layout: the pickle stores R plane, G plane, B plane per row of 3072 bytes.
    all_train = torch.cat([splits.train_x, splits.val_x])
    mean, std = NORMALISATION[name]
    raw0 = torch.from_numpy(first_batch[0].reshape(3, 32, 32).astype(np.float32)) / 255
    expected = (raw0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert any(torch.allclose(img, expected, atol=1e-5) for img in all_train)


def test_missing_dataset_says_how_to_supply_it(tmp_path):
    with pytest.raises(DataError, match=r"dataset mnist: not found under .*--download.*--data-root"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    write_mnist_like(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="dataset mnist"):
        load_dataset("mnist", tmp_path)


def test_truncated_cifar_batch_is_a_clear_error(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="dataset cifar10"):
        load_dataset("cifar10", tmp_path)


def test_mnist5k_is_real_digits_with_fixed_split():
    a = load_dataset("mnist5k")
    b = load_dataset("mnist5k")
    assert (a.spec.n_train, a.spec.n_val, a.spec.n_test) == (3500, 500, 1000)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    assert set(a.train_y.unique().tolist()) == set(range(10))
    # Real digits: mostly background with a stroke; the normalised mean is near 0 and pixel values bimodal.
    assert abs(a.train_x.mean().item()) < 0.2
    assert (a.train_x.flatten() < -0.4).float().mean().item() > 0.7


def test_crop_flip_is_a_permutation_of_padded_pixels():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape
    # With zero offsets and no flip the crop is the identity; over many draws, both happen.
    seen_identity = seen_flip = False
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        o = random_crop_flip(x[:1], gen, padding=2)
        seen_identity |= torch.equal(o, x[:1])
        seen_flip |= torch.equal(o, x[:1].flip(3))
    assert seen_identity and seen_flip


def test_train_batches_cover_every_sample_once():
    splits = load_dataset("mnist5k")
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([y for _, y in train_batches(splits, 256, gen)])
    assert labels.shape[0] == splits.spec.n_train
    assert torch.equal(labels.sort().values, splits.train_y.sort().values)
