"""The CIFAR loaders on small archives in the official formats, generated here."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch

from gscfast.data import (
    ChecksumError,
    cifar10,
    cifar100,
    load_cifar,
    standardize,
    write_fake_archive,
)
from gscfast.data.cifar import ARCHIVES


@pytest.mark.parametrize("fmt", ["python", "binary"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_both_formats_identically(tmp_path, name, fmt):
    md5 = write_fake_archive(tmp_path / fmt, name, fmt, n_train=50, n_test=20, seed=1)
    x, y = load_cifar(tmp_path / fmt, name, train=True, md5=md5)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (50,)
    xt, _yt = load_cifar(tmp_path / fmt, name, train=False, md5=md5)
    assert xt.shape == (20, 3, 32, 32)
    # the generator draws the same images for both formats: the two readers must agree
    other = "binary" if fmt == "python" else "python"
    md5o = write_fake_archive(tmp_path / other, name, other, n_train=50, n_test=20, seed=1)
    xo, yo = load_cifar(tmp_path / other, name, train=True, md5=md5o)
    assert torch.equal(x, xo) and torch.equal(y, yo)
    assert int(y.max()) < (10 if name == "cifar10" else 100)


def test_cifar10_is_standardized_with_training_statistics(tmp_path):
    md5 = write_fake_archive(tmp_path, n_train=100, n_test=30)
    x, _y = cifar10(tmp_path, md5=md5)
    assert x.shape == (100, 3072) and x.dtype == torch.float32
    per_channel = x.reshape(100, 3, 1024).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-5)
    xt, _ = cifar10(tmp_path, train=False, md5=md5)
    raw_train, _ = load_cifar(tmp_path, train=True, md5=md5)
    raw_test, _ = load_cifar(tmp_path, train=False, md5=md5)
    assert torch.allclose(xt, standardize(raw_test, raw_train))
    assert cifar100  # CIFAR-100 returns images for convolutional models (tested above)


def test_wrong_checksum_is_refused(tmp_path):
    write_fake_archive(tmp_path)
    with pytest.raises(
        ChecksumError, match="does not match the expected c58f30108f718f92721af3b95e74349a"
    ):
        load_cifar(tmp_path)  # the official sum: a generated archive is not the official one


def test_corrupted_archive_is_refused(tmp_path):
    md5 = write_fake_archive(tmp_path)
    path = tmp_path / ARCHIVES["cifar10", "python"].filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="corrupted"):
        load_cifar(tmp_path, md5=md5)
    # a broken archive whose sum the caller vouches for still fails clearly, not with a crash
    path.write_bytes(b"not a tarball")
    import hashlib

    with pytest.raises(ValueError, match="not a readable tar.gz"):
        load_cifar(tmp_path, md5=hashlib.md5(b"not a tarball").hexdigest())


def test_malicious_pickle_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for part in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / part).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    import hashlib

    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_cifar(tmp_path, md5=md5)
    assert not (tmp_path / "pwned").exists()


def test_missing_archive_and_failed_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar(tmp_path)

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(
        RuntimeError,
        match="could not download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ):
        load_cifar(tmp_path, download=True)
    assert not any(tmp_path.iterdir())  # no partial file left behind


def test_bad_batch_contents(tmp_path):
    folder = tmp_path / "src" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for part in ARCHIVES["cifar10", "binary"].train + ARCHIVES["cifar10", "binary"].test:
        (folder / part).write_bytes(
            np.zeros(3000, dtype=np.uint8).tobytes()
        )  # not 3073-byte records
    path = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    import hashlib

    with pytest.raises(ValueError, match="not a multiple of the record size 3073"):
        load_cifar(tmp_path, md5=hashlib.md5(path.read_bytes()).hexdigest())


def test_digits_split_and_standardization():
    pytest.importorskip("sklearn")
    from gscfast.data import digits

    x, y = digits(train=True)
    xt, _yt = digits(train=False)
    assert x.shape[1] == 64 and len(x) + len(xt) == 1797 and len(xt) == 359
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    assert set(y.tolist()) == set(range(10))
    assert torch.equal(digits(train=True)[0], x)  # the split is seeded
