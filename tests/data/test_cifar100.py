"""``cifar100_splits``: CIFAR-100 images for convolutional models from generated archives in both
official formats, split into training / validation / test and standardized with the training
part's statistics only."""

from __future__ import annotations

import pytest
import torch

from gscfast.data import (
    cifar100_splits,
    load_cifar,
    standardize,
    standardize_images,
    write_fake_archive,
)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, tuple[str, str]]:
    out = {}
    for fmt in ("python", "binary"):
        root = tmp_path_factory.mktemp(fmt)
        out[fmt] = (
            str(root),
            write_fake_archive(root, "cifar100", fmt, n_train=60, n_test=20, seed=5),
        )
    return out


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_splits_from_both_formats(archives, fmt):
    root, md5 = archives[fmt]
    s = cifar100_splits(root, val_size=15, md5=md5)
    raw, labels = load_cifar(root, "cifar100", train=True, md5=md5)
    raw_test, labels_test = load_cifar(root, "cifar100", train=False, md5=md5)
    (x, y), (xv, yv), (xt, yt) = s.train, s.val, s.test
    assert (
        x.shape == (45, 3, 32, 32) and xv.shape == (15, 3, 32, 32) and xt.shape == (20, 3, 32, 32)
    )
    assert x.dtype == xv.dtype == xt.dtype == torch.float32
    assert (
        torch.equal(y, labels[:45])
        and torch.equal(yv, labels[45:])
        and torch.equal(yt, labels_test)
    )
    assert y.dtype == torch.int64 and int(torch.cat([y, yv, yt]).max()) < 100
    # Standardized per channel with the statistics of the 45 training images alone.
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-5)
    assert torch.equal(xv, standardize_images(raw[45:], raw[:45]))
    assert torch.equal(xt, standardize_images(raw_test, raw[:45]))
    ref = raw[:45].double()
    assert torch.allclose(s.mean, ref.mean((0, 2, 3))) and torch.allclose(
        s.std, ref.std((0, 2, 3), unbiased=False)
    )
    black = standardize_images(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), raw[:45])[0, :, 0, 0]
    assert torch.equal(s.black, black)


def test_both_formats_agree_and_validation_size(archives):
    a = cifar100_splits(archives["python"][0], val_size=10, md5=archives["python"][1])
    b = cifar100_splits(archives["binary"][0], val_size=10, md5=archives["binary"][1])
    for part in ("train", "val", "test"):
        assert all(torch.equal(u, v) for u, v in zip(getattr(a, part), getattr(b, part)))
    none = cifar100_splits(archives["python"][0], val_size=0, md5=archives["python"][1])
    assert none.train[0].shape[0] == 60 and none.val[0].shape[0] == 0
    for bad in (60, -1):
        with pytest.raises(ValueError, match="val_size"):
            cifar100_splits(archives["python"][0], val_size=bad, md5=archives["python"][1])


def test_standardize_is_the_flattened_image_standardization(archives):
    raw, _ = load_cifar(archives["python"][0], "cifar100", md5=archives["python"][1])
    assert torch.equal(standardize(raw, raw), standardize_images(raw, raw).reshape(len(raw), -1))
