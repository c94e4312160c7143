"""Static checks of the package: ruff (lint and format) and mypy, configured in ruff.toml and
mypy.ini at the repository root. ./scripts/test installs both (the ``test`` extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF_PATHS = ["gscfast", "tests", "bench", "docs", "setup.py"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)


def _ruff() -> str:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return exe


def test_ruff_lint_is_clean():
    r = _run([_ruff(), "check", "--no-cache", *RUFF_PATHS])
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = _run([_ruff(), "format", "--check", "--no-cache", *RUFF_PATHS])
    assert r.returncode == 0, "run `ruff format` on:\n" + r.stdout + r.stderr


def test_mypy_is_clean():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")
    r = _run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini"])
    assert r.returncode == 0, r.stdout + r.stderr
