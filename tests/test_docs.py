"""The documentation (issue 12): ``mkdocs build --strict`` of ``docs/`` is clean (griffe's
docstring warnings included), the API reference renders every public name, ``docs/definitions.md``
is the project's definitions verbatim, and the code of the quick start and the workflow pages runs
as written (the study pages' commands are not run here: tests/experiments runs the studies)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gscfast

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The contract every number follows; docs/definitions.md must be a verbatim copy of it.
SHARED_DEFINITIONS = ROOT.parent / "shared" / "definitions.md"
# Pages whose code blocks are executed, in page order, one namespace per page.
RUN_PAGES = ["index.md", *sorted(str(p.relative_to(DOCS)) for p in DOCS.glob("workflows/*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>\S.*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)


def _needs_mkdocs() -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip(
        "mkdocstrings_handlers.python",
        reason="mkdocstrings-python is not installed (pip install -e '.[docs]')",
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built in strict mode: any warning (a broken link, an image that is missing, a
    docstring naming a parameter the function lacks) fails the build."""
    _needs_mkdocs()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's end-of-life banner
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert "WARNING" not in log, log
    return out


def test_strict_build_is_clean(site: Path):
    assert (site / "index.html").is_file()


def test_api_reference_renders_every_public_name(site: Path):
    html = (site / "api" / "gscfast" / "index.html").read_text()
    modules = {"autograd", "estimators", "nn", "__version__"}  # pages of their own, or a string
    missing = [n for n in gscfast.__all__ if n not in modules and f'id="gscfast.{n}"' not in html]
    assert not missing, f"not rendered on api/gscfast.md: {missing}"
    for mod in ("autograd", "estimators", "nn", "flow"):
        page = (site / "api" / mod / "index.html").read_text()
        module = getattr(gscfast, mod) if mod != "flow" else sys.modules["gscfast.flow"]
        missing = [n for n in module.__all__ if f'id="gscfast.{mod}.{n}"' not in page]
        assert not missing, f"not rendered on api/{mod}.md: {missing}"
    page = (site / "api" / "backends" / "index.html").read_text()
    for name in ("available_backends", "get_backend"):
        assert f'id="gscfast.backends.{name}"' in page


def test_study_figures_are_served(site: Path):
    results = ROOT / "bench" / "results"
    pngs = sorted(results.glob("*.png"))
    assert pngs, f"no figures in {results}"
    for png in pngs:
        assert (site / "figures" / png.name).read_bytes() == png.read_bytes()


def test_definitions_are_the_shared_contract():
    if not SHARED_DEFINITIONS.is_file():
        pytest.skip(f"{SHARED_DEFINITIONS} is not beside this checkout")
    assert (DOCS / "definitions.md").read_text() == SHARED_DEFINITIONS.read_text(), (
        f"docs/definitions.md differs from {SHARED_DEFINITIONS}: copy it again"
    )


def code_blocks(page: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of each fenced block of ``page`` that is to be run: all but
    those right after a ``<!-- not run: why -->`` comment."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().rsplit("\n", 1)[-1]
        if not NOT_RUN.fullmatch(before.strip()):
            blocks.append((m["lang"], m["body"], text.count("\n", 0, m.start()) + 1))
    return blocks


def test_code_blocks_are_found():
    blocks = code_blocks(DOCS / "workflows" / "measure.md")
    assert len(blocks) >= 5 and all(lang == "python" for lang, _, _ in blocks)
    page = DOCS / "index.md"
    assert all(lang == "python" for lang, _, _ in code_blocks(page)), "bash left unmarked"


@pytest.mark.parametrize("name", RUN_PAGES)
def test_page_code_runs(name: str, tmp_path, monkeypatch):
    """Each python block runs in one namespace per page; each line of a bash block must be a
    ``gscfast`` command, run as ``python -m gscfast``. The torch backend stands in for ``auto``:
    the examples are checked for what they compute, and numba's first compile of its kernels
    (minutes) belongs to the backend tests."""
    for module in ("matplotlib", "pandas", "tensorboard"):  # the pages plot, tabulate and log
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GSCFAST_BACKEND", "torch")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    page = DOCS / name
    blocks = code_blocks(page)
    assert blocks, f"{name} has no code to run"
    namespace: dict = {"__name__": "__docs__"}
    # the pages seed torch's global generator and open figures: leave neither to later tests
    with torch.random.fork_rng():
        try:
            _run_blocks(name, blocks, namespace)
        finally:
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close("all")


def _run_blocks(name: str, blocks: list[tuple[str, str, int]], namespace: dict) -> None:
    for lang, code, line in blocks:
        where = f"{name}, the block at line {line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)
        elif lang == "bash":
            for cmd in (c for c in code.splitlines() if c.strip() and not c.startswith("#")):
                argv = shlex.split(cmd, comments=True)
                assert argv[0] == "gscfast", f"{where}: not a gscfast command: {cmd!r}"
                r = subprocess.run(
                    [sys.executable, "-m", "gscfast", *argv[1:]],
                    env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's gscfast
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert r.returncode == 0, f"{where}: {cmd}\n{r.stdout}{r.stderr}"
        else:
            pytest.fail(f"{where}: a {lang or 'plain'} block; mark it <!-- not run: why -->")
