"""Data loaders written for gscfast (no torchvision): CIFAR-10/100 archives and sklearn's digits,
and CIFAR's standard augmentation as batched tensor ops."""

from .augment import augment, random_crop, random_hflip
from .cifar import (
    ChecksumError,
    ImageSplits,
    cifar10,
    cifar100,
    cifar100_splits,
    load_cifar,
    standardize,
    standardize_images,
    write_fake_archive,
)
from .digits import digits

__all__ = [
    "ChecksumError",
    "ImageSplits",
    "augment",
    "cifar10",
    "cifar100",
    "cifar100_splits",
    "digits",
    "load_cifar",
    "random_crop",
    "random_hflip",
    "standardize",
    "standardize_images",
    "write_fake_archive",
]
