"""Backend registry: name -> implementation, loaded lazily so optional packages stay optional.

``"auto"`` (or the ``GSCFAST_BACKEND`` environment variable) picks the available backend of
highest priority that runs on the input's device.
"""

from __future__ import annotations

import importlib
import os

import torch

from ..validation import Problem
from .base import Backend, Sweep

__all__ = ["BACKENDS", "Backend", "Problem", "Sweep", "available_backends", "get_backend"]

# name -> "module:Class" (relative to this package). Slots whose module is missing report it.
BACKENDS: dict[str, str] = {
    "reference": "reference:ReferenceBackend",
    "torch": "torch_engine:TorchBackend",
    "numba": "numba_backend:NumbaBackend",
    "triton": "triton_backend:TritonBackend",
    "cupy": "cupy_backend:CupyBackend",
}
_loaded: dict[str, type[Backend] | str] = {}


def _load(name: str) -> type[Backend] | str:
    """The backend class, or a string saying why it cannot be used here."""
    if name not in _loaded:
        module, cls = BACKENDS[name].split(":")
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(module):
                _loaded[name] = (
                    f"the {name!r} backend is not implemented in this version of gscfast"
                )
            else:
                _loaded[name] = f"the {name!r} backend needs {e.name!r} (pip install {e.name})"
        else:
            klass = getattr(mod, cls)
            _loaded[name] = klass.unavailable_reason() or klass
    return _loaded[name]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the usable backends (that run on ``device`` if given), best first."""
    found = []
    for name in BACKENDS:
        klass = _load(name)
        if isinstance(klass, str) or (
            device is not None and not klass.supports(torch.device(device))
        ):
            continue
        found.append(klass)
    return [k.name for k in sorted(found, key=lambda k: -k.priority)]


def get_backend(name: str, device: torch.device | str) -> Backend:
    """An instance of backend ``name`` (or the best one for ``device`` if ``"auto"``)."""
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get("GSCFAST_BACKEND", "auto")
    if name == "auto":
        candidates = [n for n in available_backends(device) if n != "reference"]
        name = candidates[0] if candidates else "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {list(BACKENDS)}")
    klass = _load(name)
    if isinstance(klass, str):
        raise RuntimeError(klass)
    if not klass.supports(device):
        raise RuntimeError(
            f"the {name!r} backend does not run on {device} tensors; "
            f"available there: {available_backends(device)}"
        )
    return klass()
