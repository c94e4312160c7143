"""Where the CUDA sources of the ``"cupy"`` backend are: the one lookup every user of them calls;
and the argument kinds of their entry points (``SIGNATURES``), which both the ``"cupy"`` backend
and the host build of the same sources (``_gpu_host``) read from here, so neither imports the other.

The sources live in ``kernels/`` at the top of the repository (``CMakeLists.txt`` builds them from
there). A wheel or a regular ``pip install`` carries a copy as package data in
``gscfast/_kernels/`` (``setup.py``'s build step writes it into the build tree; it is never
committed). A checkout or an editable install has no such copy and reads ``kernels/`` itself.
``GSCFAST_KERNELS_DIR`` overrides both; a folder it names without sources is an error, not a
fallback to the others.
"""

from __future__ import annotations

import os
from pathlib import Path

# entry point (without the _f32/_f64 suffix) -> argument kinds: p pointer, i long long
SIGNATURES = {
    "gsc_layer_fwd": "p" * 13 + "i" * 7,
    "gsc_chain_step": "p" * 8 + "i" * 7,
    "gsc_contrib_step": "p" * 13 + "i" * 5,
}

ENV = "GSCFAST_KERNELS_DIR"
PACKAGED = Path(__file__).resolve().parents[1] / "_kernels"
"""The copy inside an installed package (wheel, ``pip install .``)."""
CHECKOUT = Path(__file__).resolve().parents[2] / "kernels"
"""``kernels/`` of the source tree this package is imported from (checkout, editable install)."""


def _has_sources(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*.cu"))


def find_kernel_dir() -> Path | None:
    """The folder of the CUDA sources: ``GSCFAST_KERNELS_DIR``, else the package data, else the
    checkout's ``kernels/``; None if the chosen place has no ``*.cu``."""
    env = os.environ.get(ENV)
    for d in [Path(env)] if env else [PACKAGED, CHECKOUT]:
        if _has_sources(d):
            return d
    return None


def missing_reason() -> str:
    """Why no CUDA sources were found, and how to fix it."""
    env = os.environ.get(ENV)
    if env:
        return (
            f"{ENV}={env} holds no CUDA sources (*.cu): point it at the kernels/ folder of a "
            f"gscfast checkout, or unset it"
        )
    return (
        "the CUDA sources of the 'cupy' backend (kernels/*.cu, kernels/common/*.cuh) are missing "
        f"from this installation: neither {PACKAGED} (the package data a wheel or `pip install .` "
        f"carries) nor {CHECKOUT} (a checkout's kernels/) has them. Reinstall gscfast from a "
        "wheel or source tree built by its setup.py (`pip install .`, `pip wheel .`), or set "
        f"{ENV} to the kernels/ folder of a gscfast checkout"
    )


def kernel_dir() -> Path:
    """The folder of the CUDA sources (``-I`` for their ``common/`` headers); raises
    ``FileNotFoundError`` with ``missing_reason()`` if there is none."""
    d = find_kernel_dir()
    if d is None:
        raise FileNotFoundError(missing_reason())
    return d


def kernel_sources() -> list[Path]:
    """The kernel sources ``*.cu`` (one module each), sorted; empty if none are found."""
    d = find_kernel_dir()
    return sorted(d.glob("*.cu")) if d is not None else []
