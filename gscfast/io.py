"""File output shared by the library and the studies: atomic writes, figures written atomically, and
the user cache folder where gscfast keeps what it builds (numba kernels, the CUDA host build, fatbins).

A library module (not under ``experiments/``) so that library code such as ``GradientFlow`` writes
files the same way the studies' runner does without importing the studies.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CACHE_ENV", "atomic_write", "cache_dir", "pyplot", "save_figure"]

CACHE_ENV = "GSCFAST_CACHE"


def cache_dir() -> Path:
    """Where gscfast keeps what it builds (numba's compiled kernels, the host library of the CUDA
    kernels, fatbins of an installation): ``$GSCFAST_CACHE``, else ``$XDG_CACHE_HOME/gscfast``,
    else ``~/.cache/gscfast``; never inside the package, which may be a read-only
    ``site-packages``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gscfast"


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete: a temp file in
    the same directory, flushed to disk, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (studies only write files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, paths: Iterable[Path], dpi: int = 150) -> None:
    """Write ``fig`` to each path (format from the suffix: .png, .pdf) atomically, then close it."""
    plt = pyplot()
    try:
        for path in paths:
            buf = io.BytesIO()
            fig.savefig(buf, format=Path(path).suffix[1:], dpi=dpi)
            atomic_write(path, buf.getvalue())
    finally:
        plt.close(fig)
