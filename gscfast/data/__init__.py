"""Data loaders written for gscfast (no torchvision): CIFAR-10/100 archives and sklearn's digits."""
from .cifar import ChecksumError, cifar10, cifar100, load_cifar, standardize, write_fake_archive
from .digits import digits

__all__ = ["cifar10", "cifar100", "load_cifar", "standardize", "write_fake_archive", "digits",
           "ChecksumError"]
