"""The CUDA sources travel with the package: a wheel built from this checkout, installed into a
fresh venv, finds every source of ``kernels/`` and the host build of the CUDA logic runs from the
installed copy (``gscfast/backends/cuda_sources.py``, ``setup.py``'s ``build_py`` step).

About 10-20 s on 2 cores (pip, one host build of the kernels, a small comparison).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from gscfast.backends import _gpu_host
from gscfast.backends import cuda_sources as cs

ROOT = Path(__file__).resolve().parents[1]
KDIR = ROOT / "kernels"
# what a clean clone would not have: build outputs, environments, results
JUNK = {
    ".git",
    ".venv",
    "build",
    "dist",
    "results",
    "__pycache__",
    ".hypothesis",
    ".pytest_cache",
    ".benchmarks",
    ".whl",
    ".gl",
    "_kernels",
}


def _digests(d: Path) -> dict[str, str]:
    """Relative path -> sha256 of every CUDA source (``*.cu``, ``*.cuh``) under ``d``."""
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in d.rglob("*")
        if p.suffix in (".cu", ".cuh") and p.is_file()
    }


def _clean_copy(dst: Path) -> Path:
    """The checkout without build outputs, so the build neither sees nor writes anything in it."""
    shutil.copytree(
        ROOT,
        dst,
        ignore=lambda _, names: [n for n in names if n in JUNK or n.endswith(".egg-info")],
    )
    return dst


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


# Run by the venv's python, outside the checkout: where the installed package finds its sources,
# whether the CuPy backend says it can run, and the host build of those sources against the
# reference backend on a small network.
PROBE = r"""
import hashlib, json, os, sys
from pathlib import Path
import torch
from torch import nn
import gscfast
from gscfast.backends import _gpu_host, cupy_backend as cb, cuda_sources as cs
from gscfast.backends.reference import ReferenceBackend
from gscfast.validation import make_problem

kdir = cs.kernel_dir()
out = {"gscfast": gscfast.__file__, "kernel_dir": str(kdir),
       "sources": {p.relative_to(kdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in kdir.rglob("*") if p.suffix in (".cu", ".cuh") and p.is_file()}}
try:
    import cupy  # noqa: F401
    out["cupy_reason"] = cb.CupyBackend.unavailable_reason()
except ImportError:
    pass
out["fatbin_dir"] = str(cb.fatbin_dir())
if _gpu_host.compiler() is not None:
    out["host_lib"] = str(_gpu_host.build())
    cb.HOST_EMULATION = True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 17), nn.Tanh(), nn.Linear(17, 5), nn.LayerNorm(5), nn.ReLU(),
                          nn.Linear(5, 3)).double()
    x = torch.randn(2, 20, 7, dtype=torch.float64)
    pb, _ = make_problem(model, x, torch.randn(2, 20, 3, dtype=torch.float64), error="dot")
    be = cb.CupyBackend()
    assert be.fused(pb), "the small network must run on the fused kernels"
    a, b = be.sweep(pb, grads=True, stats=False), ReferenceBackend().sweep(pb, grads=True, stats=False)
    out["host_sweep_max_rel"] = max(
        ((u - v).abs() / v.abs().clamp_min(1e-300)).max().item()
        for u, v in ((a.sq_out, b.sq_out), (a.sq_grad, b.sq_grad)))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _clean_copy(tmp / "src")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        cwd=tmp,
    )
    (whl,) = (tmp / "dist").glob("gscfast-*.whl")
    return whl


def test_installed_wheel_finds_every_cuda_source_and_builds_them_for_the_host(wheel, tmp_path):
    want = _digests(KDIR)
    assert any(k.endswith(".cu") for k in want) and any(k.endswith(".cuh") for k in want)
    pip_version = tuple(int(x) for x in importlib.metadata.version("pip").split(".")[:2])
    if pip_version < (22, 3):
        pytest.skip(f"pip {pip_version} has no --python (22.3+) to install into another venv")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    # --ignore-installed: this environment's gscfast (a checkout) must neither satisfy the
    # requirement nor be uninstalled; the venv gets its own copy
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-q",
            str(wheel),
        ]
    )
    # torch, numba, cupy of the test environment: a venv of a venv sees only the base Python's
    # packages, so list this environment's site folders (plain paths: their .pth files, such as an
    # editable install of the checkout, are not run)
    vsite = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
    )
    (vsite / "zz_test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", cs.ENV, "GSCFAST_FATBIN_DIR", "PYTHONSTARTUP")
    }
    env["GSCFAST_HOST_BUILD"] = str(tmp_path / "host")  # a fresh build, not a cached library
    env["GSCFAST_CACHE"] = str(tmp_path / "cache")
    run_dir = tmp_path / "elsewhere"  # cwd outside the checkout: it is not on sys.path
    run_dir.mkdir()
    got = json.loads(
        _run([str(py), "-c", PROBE], cwd=run_dir, env=env).stdout.strip().splitlines()[-1]
    )

    pkg = Path(got["gscfast"]).parent
    assert pkg.is_relative_to(vsite), f"imported {got['gscfast']}, not the installed wheel"
    assert Path(got["kernel_dir"]) == pkg / "_kernels"
    assert got["sources"] == want, "the installed sources differ from the checkout's kernels/"
    assert Path(got["fatbin_dir"]) == tmp_path / "cache" / "fatbin"  # not beside the package
    if "cupy_reason" in got:
        assert got["cupy_reason"] is None
    if _gpu_host.compiler() is None:
        pytest.skip("no C++ compiler (g++/clang++) for the host build of kernels/*.cu")
    assert Path(got["host_lib"]).parent == tmp_path / "host"
    assert got["host_sweep_max_rel"] < 1e-9


def test_wheel_holds_no_stale_kernel(tmp_path):
    """A kernel file left in the build tree by an earlier build (a source since deleted) does not
    reach the wheel: the build step empties ``gscfast/_kernels/`` first."""
    import zipfile

    src = _clean_copy(tmp_path / "src")
    stale = src / "build" / "lib" / "gscfast" / "_kernels" / "deleted.cu"
    stale.parent.mkdir(parents=True)
    stale.write_text("// an old kernel\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        cwd=tmp_path,
    )
    assert (src / "build" / "lib" / "gscfast" / "_kernels").is_dir(), (
        "the build used another folder"
    )
    (whl,) = (tmp_path / "dist").glob("gscfast-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    got = {
        n[len("gscfast/_kernels/") :]
        for n in names
        if n.startswith("gscfast/_kernels/") and n.endswith((".cu", ".cuh"))
    }
    assert got == set(_digests(KDIR))


def test_sdist_carries_kernels(tmp_path):
    """``pip install gscfast-*.tar.gz`` builds its wheel from the sdist, so the sdist needs kernels/."""
    src = _clean_copy(tmp_path / "src")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sd")], cwd=src)
    (sd,) = (tmp_path / "sd").glob("gscfast-*.tar.gz")
    with tarfile.open(sd) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {f"kernels/{k}" for k in _digests(KDIR)} <= names
    assert "CMakeLists.txt" in names


def test_missing_sources_say_so(monkeypatch, tmp_path):
    """An installation without the sources: the CuPy backend's reason names the packaging."""
    from gscfast.backends import cupy_backend as cb

    monkeypatch.delenv(cs.ENV, raising=False)
    monkeypatch.setattr(cs, "PACKAGED", tmp_path / "none1")
    monkeypatch.setattr(cs, "CHECKOUT", tmp_path / "none2")
    assert cs.find_kernel_dir() is None and cs.kernel_sources() == []
    with pytest.raises(FileNotFoundError, match="missing from this installation"):
        cs.kernel_dir()
    reason = _gpu_host.unavailable_reason() or ""
    assert "missing from this installation" in reason or "C++ compiler" in reason
    pytest.importorskip("cupy", reason="cupy is not installed (its reason is then about cupy)")
    reason = cb.CupyBackend.unavailable_reason()
    assert reason and "missing from this installation" in reason and "pip install ." in reason


def test_lookup_order(monkeypatch, tmp_path):
    """Package data first, else the checkout; an explicit GSCFAST_KERNELS_DIR never falls back."""
    pkg, co = tmp_path / "pkg", tmp_path / "co"
    for d in (pkg, co):
        d.mkdir()
        (d / "a.cu").write_text("")
    monkeypatch.delenv(cs.ENV, raising=False)
    monkeypatch.setattr(cs, "PACKAGED", pkg)
    monkeypatch.setattr(cs, "CHECKOUT", co)
    assert cs.kernel_dir() == pkg
    (pkg / "a.cu").unlink()
    assert cs.kernel_dir() == co
    monkeypatch.setenv(cs.ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=cs.ENV):
        cs.kernel_dir()
