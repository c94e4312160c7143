"""Shared setup of the GPU-backend tests: the ``gpu`` marker, poisoned buffers, skips with reasons."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton decides at its first import whether it interprets kernels; without a GPU the Triton tests
# interpret them, so ask for that before anything imports triton (compiled runs use a subprocess).
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gscfast.backends import _gpu_engine


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the fused engine allocates starts as NaN: an element no kernel writes shows."""
    monkeypatch.setattr(_gpu_engine, "POISON", True)
