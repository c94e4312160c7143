"""MkDocs hook: the studies' figures and summaries are served from where the studies wrote them.

``bench/results/`` is their one home (the README and bench/README.md link them there); copying
them into ``docs/`` would leave two versions to drift apart. At build time each
``bench/results/<study>-*.png`` becomes ``figures/<name>.png`` of the site and each
``<study>-summary.md`` the page ``results/<study>-summary.md``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"figures/{path.name}", abs_src_path=str(path)))
    for path in sorted(RESULTS.glob("*-summary.md")):
        files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
