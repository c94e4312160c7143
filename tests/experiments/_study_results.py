"""What a resumed or regenerated study run must reproduce exactly: its numbers, not its timings."""

from __future__ import annotations

import json
from pathlib import Path


def numbers(d: Path, csv_name: str, timing_keys: tuple[str, ...] = ("timings", "seconds")) -> dict:
    """``results.json`` without its timing keys, one CSV output and every job's result."""
    res = json.loads((d / "results.json").read_text())
    for k in timing_keys:
        res.pop(k, None)
    jobs = {p.name: json.loads(p.read_text())["result"] for p in sorted((d / "jobs").iterdir())}
    return {"results": res, "csv": (d / csv_name).read_text(), "jobs": jobs}
