"""Where numba caches gscfast's compiled kernels: one cache per user and machine, shared by every
clone, checkout and environment of gscfast, so compiling the kernels is paid once per machine
rather than once per copy of the source.

numba's own cache sits next to the source file (``__pycache__``): a new clone, a new virtual
environment or a read-only ``site-packages`` compiles everything again. Here a kernel file
registered with ``register`` is cached under ``gscfast.io.cache_dir() / "numba"`` (the root
of everything gscfast builds: ``$GSCFAST_CACHE``, ``$XDG_CACHE_HOME/gscfast`` or
``~/.cache/gscfast``) in a folder named by a hash of what decides the compiled code:

- the **content** of the kernel file and of the files whose constants it compiles in (not their
  paths or mtimes: two clones of one commit share it);
- the numba, llvmlite, numpy and Python versions;
- the CPU that code is generated for (``NUMBA_CPU_NAME`` or the host's).

numba keys each entry inside that folder further by signature, target and bytecode.
Other files (any other user of numba) keep numba's usual locations.

Robustness: caching is best effort. ``register`` returns False when the cache folder cannot be
created or written, and the kernels are then compiled without caching (never an error). Several
processes may fill one cache at once (pytest-xdist, ray workers): numba writes every file to a
temporary name and renames it, and ``attach`` replaces numba's numbered data files
(``<fn>.1.nbc``, ``<fn>.2.nbc``, ... chosen by counting the index, so two processes compiling
two signatures at once can both pick ``.1`` and leave an index entry pointing at the other's
code) with data files named by a hash of their own index key, written before the index names
them. A lost race then only loses an index entry (a later run compiles that signature again),
never pairs a signature with another signature's code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import llvmlite
import numba
import numpy as np
from llvmlite import binding as llvm
from numba.core import caching, config
from numba.core.dispatcher import Dispatcher

from ..io import cache_dir

# realpath of a registered kernel file -> its cache folder
_FOLDERS: dict[str, Path] = {}


def cpu_name() -> str:
    """The CPU numba generates code for: ``NUMBA_CPU_NAME`` if set, else the host's."""
    return getattr(config, "CPU_NAME", None) or llvm.get_host_cpu_name()


def folder(path: str | os.PathLike, *depends: str | os.PathLike) -> Path:
    """The cache folder of the kernel file ``path``: named by its content, the content of the
    files ``depends`` whose values it freezes into its code, and the versions and CPU that
    decide the compiled code (see the module docstring)."""
    h = hashlib.sha256(Path(path).read_bytes())
    for dep in depends:
        h.update(b"\0" + Path(dep).read_bytes())
    for part in (
        numba.__version__,
        llvmlite.__version__,
        np.__version__,
        sys.version,
        platform.machine(),
        cpu_name(),
    ):
        h.update(b"\0" + part.encode())
    return cache_dir() / "numba" / f"{Path(path).stem}-{h.hexdigest()[:24]}"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def register(path: str | os.PathLike, *depends: str | os.PathLike) -> bool:
    """Cache the numba functions defined in the file ``path`` (a kernel module passes its
    ``__file__`` before its decorators run) in the shared cache, in a folder keyed also by the
    content of ``depends`` (modules whose constants the kernels compile in). Returns whether caching is
    possible, for the decorators' ``cache=`` option: False where the folder cannot be created
    or written (read-only home, full disk), and the kernels then compile without caching."""
    where = folder(path, *depends)
    if not _writable(where):
        return False
    _FOLDERS[os.path.realpath(path)] = where
    locators: list[Any] = caching.CacheImpl._locator_classes
    if SharedLocator not in locators:
        # ahead of numba's own locators; it answers only for registered files
        locators.insert(0, SharedLocator)
    return True


class SharedLocator(caching._CacheLocator):
    """numba cache locator for the files passed to ``register``; None (numba's next locator)
    for every other file."""

    def __init__(self, py_func: Any, py_file: str, where: Path) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._where = where

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> SharedLocator | None:
        where = _FOLDERS.get(os.path.realpath(py_file))
        return None if where is None else cls(py_func, py_file, where)

    def ensure_cache_path(self) -> None:
        # checked by register; a folder removed since is made again, a failure only skips saving
        try:
            super().ensure_cache_path()
        except OSError:
            pass

    def get_cache_path(self) -> str:
        return str(self._where)

    def get_source_stamp(self) -> str:
        # the folder is already keyed by the file's content
        return self._where.name

    def get_disambiguator(self) -> str:
        return str(self._lineno)


class KeyedDataFile(caching.IndexDataCacheFile):
    """numba's index + data files, with one data file per index key (named by the key's hash),
    written before the index entry that names it; I/O errors are cache misses, not failures."""

    def _name_for(self, key: Any) -> str:
        digest = hashlib.sha256(str(key).encode()).hexdigest()[:20]
        return f"{self._index_name[: -len('.nbi')]}.{digest}.nbc"

    def save(self, key: Any, data: Any) -> None:
        name = self._name_for(key)
        try:
            self._save_data(name, data)
            overloads = self._load_index()
            if overloads.get(key) != name:
                overloads[key] = name
                self._save_index(overloads)
        except OSError:
            pass

    def load(self, key: Any) -> Any:
        try:
            return super().load(key)
        except (OSError, EOFError, pickle.UnpicklingError):
            return None


def attach(namespace: dict[str, Any]) -> None:
    """Give every cached numba function in ``namespace`` (a kernel module's ``globals()``, after
    its definitions) whose cache is in the shared folder the race-free data files of
    ``KeyedDataFile``."""
    for obj in list(namespace.values()):
        cache = getattr(obj, "_cache", None) if isinstance(obj, Dispatcher) else None
        if not isinstance(cache, caching.Cache):
            continue
        if not isinstance(cache._impl.locator, SharedLocator):
            continue
        old = cache._cache_file
        cache._cache_file = KeyedDataFile(
            cache_path=old._cache_path,
            filename_base=cache._impl.filename_base,
            source_stamp=old._source_stamp,
        )


def caches(dispatcher: Dispatcher) -> bool:
    """Whether ``dispatcher`` saves its machine code to a cache (``cache=True`` and a writable
    folder)."""
    return isinstance(getattr(dispatcher, "_cache", None), caching.Cache)


def cached_signatures(dispatcher: Dispatcher) -> list[tuple]:
    """The argument types of every signature whose machine code ``dispatcher``'s cache holds (read
    from its index file; empty where it has no cache or the index cannot be read)."""
    cache = getattr(dispatcher, "_cache", None)
    if not isinstance(cache, caching.Cache):
        return []
    try:
        return [key[0] for key in cache._cache_file._load_index()]
    except Exception:  # a missing, partial or foreign index is a miss, as numba treats it
        return []
