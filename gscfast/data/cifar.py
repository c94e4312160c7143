"""CIFAR-10 / CIFAR-100 from the official archives, without torchvision.

Both official formats are read: the "python version" (pickled batches) and the "binary version".
Every archive is checked against its MD5 sum before anything in it is read, and pickles are read
with a restricted unpickler that accepts only what the official batches contain (dicts, lists,
strings, numbers and numpy uint8 arrays), so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ARCHIVES",
    "ChecksumError",
    "CifarArchive",
    "ImageSplits",
    "channel_stats",
    "cifar10",
    "cifar100",
    "cifar100_splits",
    "load_cifar",
    "standardize",
    "standardize_images",
]


class ChecksumError(ValueError):
    """An archive's MD5 sum is not the expected one."""


@dataclass(frozen=True)
class CifarArchive:
    """One official archive: its file name, MD5 sum, format and layout."""

    name: str  # "cifar10" or "cifar100"
    filename: str
    md5: str
    fmt: str  # "python" or "binary"
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.filename}"


ARCHIVES: dict[tuple[str, str], CifarArchive] = {
    ("cifar10", "python"): CifarArchive(
        "cifar10",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "python",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
    ),
    ("cifar10", "binary"): CifarArchive(
        "cifar10",
        "cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530",
        "binary",
        "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
    ),
    ("cifar100", "python"): CifarArchive(
        "cifar100",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "python",
        "cifar-100-python",
        ("train",),
        ("test",),
    ),
    ("cifar100", "binary"): CifarArchive(
        "cifar100",
        "cifar-100-binary.tar.gz",
        "03b5dce01913d631647c71ecec9e9cb8",
        "binary",
        "cifar-100-binary",
        ("train.bin",),
        ("test.bin",),
    ),
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _RestrictedUnpickler(pickle.Unpickler):
    """Only the globals a CIFAR batch needs (numpy array reconstruction)."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: a CIFAR batch "
            "contains only dicts, lists, strings and numpy arrays"
        )


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{where}: not a valid CIFAR batch ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_python_batch(data: bytes, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(data, where)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{where}: missing 'data' or {label_key!r} (keys: {sorted(batch)})")
    images = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if (
        images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != 3072
        or len(labels) != len(images)
    ):
        raise ValueError(
            f"{where}: expected uint8 data [N, 3072] and N labels, got "
            f"{images.dtype} {images.shape} and {labels.shape}"
        )
    return images, labels


def _read_binary_batch(data: bytes, where: str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    rec = label_bytes + 3072
    if len(data) % rec:
        raise ValueError(f"{where}: size {len(data)} is not a multiple of the record size {rec}")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, rec)
    return arr[:, label_bytes:].copy(), arr[:, label_bytes - 1].astype(np.int64)  # fine label last


def _download(url: str, dest: Path) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({e}); download it by hand into {dest.parent}"
        ) from e
    os.replace(tmp, dest)


def load_cifar(
    root: str | os.PathLike,
    name: str = "cifar10",
    *,
    train: bool = True,
    download: bool = False,
    fmt: str | None = None,
    md5: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 of an official CIFAR archive.

    Args:
        root: folder holding the archive (``cifar-10-python.tar.gz`` etc.).
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        train: the training set (else the test set).
        download: fetch the archive from the official location if it is missing.
        fmt: ``"python"`` or ``"binary"``; default: whichever archive is in ``root`` (python first).
        md5: the expected MD5 sum (default: the official one). Archives that do not match are
            refused before they are opened.
    """
    root = Path(root)
    fmts = [fmt] if fmt else ["python", "binary"]
    if name not in ("cifar10", "cifar100") or any(f not in ("python", "binary") for f in fmts):
        raise ValueError(f"unknown CIFAR archive {name!r} / {fmt!r}")
    archive = next(
        (ARCHIVES[name, f] for f in fmts if (root / ARCHIVES[name, f].filename).exists()), None
    )
    if archive is None:
        archive = ARCHIVES[name, fmts[0]]
        if not download:
            raise FileNotFoundError(
                f"{root / archive.filename} not found; pass download=True or "
                f"put the official archive there (from {archive.url})"
            )
        root.mkdir(parents=True, exist_ok=True)
        _download(archive.url, root / archive.filename)
    path = root / archive.filename
    expected = md5 or archive.md5
    actual = _md5(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: MD5 {actual} does not match the expected {expected}; "
            "the file is corrupted or not the official archive: delete it and "
            "download it again"
        )
    members = archive.train if train else archive.test
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in members:
                where = f"{path}:{archive.folder}/{member}"
                try:
                    f = tar.extractfile(f"{archive.folder}/{member}")
                except KeyError:
                    f = None
                if f is None:
                    raise ValueError(f"{where}: missing from the archive")
                data = f.read()
                if archive.fmt == "python":
                    im, lb = _read_python_batch(
                        data, where, "labels" if name == "cifar10" else "fine_labels"
                    )
                else:
                    im, lb = _read_binary_batch(data, where, 1 if name == "cifar10" else 2)
                images.append(im)
                labels.append(lb)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable tar.gz archive ({e})") from e
    x = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
    y = torch.from_numpy(np.concatenate(labels))
    classes = 10 if name == "cifar10" else 100
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{path}: labels outside [0, {classes})")
    return x, y


def channel_stats(reference: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of images ``[N, C, H, W]``, float64 ``[C]``."""
    ref = reference.to(torch.float64)
    return ref.mean((0, 2, 3)), ref.std((0, 2, 3), unbiased=False)


def standardize_images(images: Tensor, reference: Tensor) -> Tensor:
    """Per-channel standardization with ``reference``'s statistics (the training set), keeping
    the image shape: uint8 ``[N, C, H, W]`` -> float32 ``[N, C, H, W]`` (computed in float64)."""
    return _standardized(images, *channel_stats(reference))


def _standardized(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return ((images.to(torch.float64) - mean[:, None, None]) / std[:, None, None]).to(torch.float32)


def standardize(images: Tensor, reference: Tensor) -> Tensor:
    """Per-channel standardization with ``reference``'s statistics (the training set),
    flattened: uint8 ``[N, 3, 32, 32]`` -> float32 ``[N, 3072]``."""
    return standardize_images(images, reference).reshape(len(images), -1)


def cifar10(
    root: str | os.PathLike,
    train: bool = True,
    download: bool = False,
    *,
    md5: str | None = None,
    fmt: str | None = None,
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 as the CIFAR study uses it: ``x [N, 3072]`` float32, standardized per channel with
    the training set's mean and std; ``y [N]`` int64 labels."""
    train_x, train_y = load_cifar(root, "cifar10", train=True, download=download, fmt=fmt, md5=md5)
    if train:
        return standardize(train_x, train_x), train_y
    test_x, test_y = load_cifar(root, "cifar10", train=False, download=False, fmt=fmt, md5=md5)
    return standardize(test_x, train_x), test_y


def cifar100(
    root: str | os.PathLike,
    train: bool = True,
    download: bool = False,
    *,
    md5: str | None = None,
    fmt: str | None = None,
) -> tuple[Tensor, Tensor]:
    """CIFAR-100 images ``[N, 3, 32, 32]`` uint8 and fine labels ``[N]`` (for convolutional models)."""
    return load_cifar(root, "cifar100", train=train, download=download, fmt=fmt, md5=md5)


@dataclass(frozen=True)
class ImageSplits:
    """Standardized float32 images ``[N, 3, 32, 32]`` with int64 labels per split, and the
    per-channel statistics (of ``train``) they were standardized with."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    mean: Tensor  # float64 [3], in pixel units (0..255)
    std: Tensor

    @property
    def black(self) -> Tensor:
        """A black pixel (value 0 in every channel) after standardization, float32 ``[3]``: what
        zero padding of the raw image becomes (the fill of a random crop)."""
        return (-self.mean / self.std).to(torch.float32)


def cifar100_splits(
    root: str | os.PathLike,
    *,
    val_size: int = 2500,
    download: bool = False,
    md5: str | None = None,
    fmt: str | None = None,
) -> ImageSplits:
    """CIFAR-100 for convolutional models, as the ``vgg`` study uses it.

    ``train`` is the official training set but its last ``val_size`` images, ``val`` those last
    ``val_size`` images (a held-out validation set), ``test`` the official test set; all
    standardized per channel with the statistics of ``train`` alone (nothing of the validation or
    test images leaks into training); fine labels.
    """
    x, y = load_cifar(root, "cifar100", train=True, download=download, fmt=fmt, md5=md5)
    if not isinstance(val_size, int) or not 0 <= val_size < len(x):
        raise ValueError(f"val_size must be an integer in [0, {len(x)}), got {val_size!r}")
    n = len(x) - val_size
    xt, yt = load_cifar(root, "cifar100", train=False, fmt=fmt, md5=md5)
    mean, std = channel_stats(x[:n])  # once: each pass converts the whole set to float64
    return ImageSplits(
        train=(_standardized(x[:n], mean, std), y[:n].clone()),
        val=(_standardized(x[n:], mean, std), y[n:].clone()),
        test=(_standardized(xt, mean, std), yt),
        mean=mean,
        std=std,
    )


def write_fake_archive(
    root: str | os.PathLike,
    name: str = "cifar10",
    fmt: str = "python",
    *,
    n_train: int = 50,
    n_test: int = 20,
    seed: int = 0,
) -> str:
    """Write a small archive in an official CIFAR format (random images) and return its MD5.

    For tests and offline smoke runs: no machine of this project can reach the official download.
    """
    archive = ARCHIVES[name, fmt]
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    parts = archive.train + archive.test
    sizes = [n_train // len(archive.train)] * len(archive.train) + [n_test]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / archive.folder
        folder.mkdir()
        for part, n in zip(parts, sizes):
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, classes, n)
            if fmt == "python":
                key = b"labels" if name == "cifar10" else b"fine_labels"
                obj = {
                    b"batch_label": part.encode(),
                    key: labels.tolist(),
                    b"data": data,
                    b"filenames": [f"{i}.png".encode() for i in range(n)],
                }
                (folder / part).write_bytes(pickle.dumps(obj, protocol=2))
            else:
                lead = labels[:, None].astype(np.uint8)
                if name == "cifar100":
                    lead = np.concatenate([lead // 5, lead], axis=1)  # coarse, fine
                (folder / part).write_bytes(np.concatenate([lead, data], axis=1).tobytes())
        with tarfile.open(root / archive.filename, "w:gz") as tar:
            tar.add(folder, arcname=archive.folder)
    return _md5(root / archive.filename)
