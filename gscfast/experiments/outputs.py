"""What every study shares around the runner: devices, strict JSON, CSV numbers, figures written
atomically, the machine line of a summary, and the tail of a study's command (run, report an
interrupted or partial run, write the outputs)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write, pyplot, save_figure
from ..machine import describe as describe_machine
from .runner import (
    ResultsDirError,
    RunResult,
    Study,
    UsageError,
    check_out_dir,
    check_run_options,
    run,
)

__all__ = [
    "add_study_arguments",
    "check_command",
    "check_device",
    "check_number",
    "check_numbers",
    "expand_names",
    "fmt",
    "json_safe",
    "mean_or_none",
    "num",
    "pyplot",
    "resolve_device",
    "resolve_dtype",
    "run_command",
    "run_info",
    "run_timings",
    "save_figure",
    "sci",
    "t_interval",
    "write_json",
]


def add_study_arguments(
    p: argparse.ArgumentParser,
    *,
    device: str = "auto",
    dtype: str | None = "float32",
    backend: str | None = "the measurements",
) -> None:
    """``--seed``, ``--device`` and, unless None, ``--dtype`` (default ``dtype``) and
    ``--backend`` (help: what the backend computes)."""
    p.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    if backend is not None:
        p.add_argument(
            "--backend", default="auto", help=f"gscfast backend for {backend} (default auto)"
        )
    p.add_argument(
        "--device",
        default=device,
        help=f"auto (cuda if available; then --engine ray gives each job one GPU), cpu, "
        f"cuda, cuda:1, ... (default {device})",
    )
    if dtype is not None:
        p.add_argument("--dtype", choices=("float32", "float64"), default=dtype)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str, *, here: bool = True) -> torch.device:
    """``resolve_device(name)``, or ``UsageError`` naming ``--device`` if ``name`` is no device,
    names the ``meta`` device (no data), or (``here``: the jobs run in this process) cannot hold a
    tensor here (e.g. ``cuda`` without a GPU, ``cuda:3`` with one GPU)."""
    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "meta":
        raise UsageError("--device meta holds no data; use auto, cpu, cuda or cuda:N")
    if here:
        try:
            torch.empty(0, device=device)
        except Exception as e:  # AssertionError (no CUDA build), RuntimeError (no such GPU), ...
            raise UsageError(
                f"--device {name} is not available here ({str(e).splitlines()[0][:120]})"
            ) from None
    return device


def check_command(args: argparse.Namespace, out: str | Path | None = None) -> None:
    """Refuse, with ``UsageError`` naming the option, a bad value of the options every study's
    command shares (``add_runner_arguments``, ``add_study_arguments``: threads, engine, address,
    CPUs, job limit, device, backend) and an ``out`` (default ``args.out``) that cannot be created
    or written. Writes nothing: call it before any work, so that a corrected command is never
    refused as another run."""
    check_run_options(
        engine=args.engine,
        address=args.address,
        num_cpus=args.num_cpus,
        threads=args.threads,
        max_jobs=args.max_jobs,
        cli=True,
    )
    here = args.engine == "local"  # with Ray, the jobs' machines may have other devices
    device = check_device(args.device, here=here) if hasattr(args, "device") else None
    backend = getattr(args, "backend", "auto")
    if backend != "auto":
        from ..backends import BACKENDS, get_backend

        if backend not in BACKENDS:
            raise UsageError(
                f"--backend {backend!r} is unknown; choose auto or one of {', '.join(BACKENDS)}"
            )
        if here and device is not None:
            try:
                get_backend(backend, device)
            except (RuntimeError, ValueError) as e:
                raise UsageError(f"--backend {backend}: {e}") from None
    try:
        check_out_dir(Path(args.out if out is None else out))
    except ResultsDirError as e:
        raise UsageError(f"--out {e}") from None


def resolve_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"float64"`` -> the torch dtype."""
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"dtype must be float32 or float64, got {name!r}")
    return dtypes[name]


def expand_names(
    words: Iterable[str],
    groups: dict[str, list[str]],
    check: Callable[[str], Any],
    what: str = "architectures",
) -> list[str]:
    """Command-line words (names or group names) -> names, in order, without repeats; ``check``
    raises ``ValueError`` on an unknown name."""
    names: list[str] = []
    for w in words:
        for name in groups.get(w, [w]):
            check(name)
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no {what} given")
    return names


def check_number(
    value: Any, what: str, *, finite: bool = True, none: bool = False, integer: bool = False
) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``value`` is a number as a job wrote it: an
    ``int`` or ``float`` but never a ``bool`` (``isinstance(True, int)`` is True, and JSON's
    ``true`` must not pass for 1), an ``int`` if ``integer``, NaN or infinite only if not
    ``finite``, ``None`` (JSON null: ``json_safe`` of a non-finite value) only if ``none``."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number (got {json.dumps(value, default=repr)[:40]})")
    if integer and not isinstance(value, int):
        raise ValueError(f"{what} is not an integer (got {value!r})")
    if finite and not math.isfinite(value):
        raise ValueError(f"{what} is not finite (got {value!r})")


def check_numbers(
    value: Any, what: str, length: int | None = None, *, finite: bool = True, none: bool = False
) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``value`` is a list (of ``length`` items, if
    given) of numbers as ``check_number`` accepts them."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValueError(f"{what} is not a list of {'' if length is None else f'{length} '}numbers")
    for i, v in enumerate(value):
        check_number(v, f"{what}[{i}]", finite=finite, none=none)


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict, indented JSON, written atomically."""
    atomic_write(path, json.dumps(json_safe(obj), indent=1) + "\n")


def num(v: float | None) -> str:
    """Exact (round-trip) text of a number for CSV; empty for None and NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v)) if isinstance(v, float) else repr(v)


def fmt(v: float | None, digits: int = 3) -> str:
    """Fixed-point text for tables; ``n/a`` for None and non-finite values."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f}"


def sci(v: float | None, digits: int = 3) -> str:
    """Significant-digit text for tables; ``n/a`` for None and non-finite values."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}"


def mean_or_none(values: Iterable[float | None]) -> float | None:
    v = [t for t in values if t is not None]
    return sum(v) / len(v) if v else None


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, low, high, sample std)``: Student-t confidence interval for the mean of the finite
    values (NaN bounds with fewer than two)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (math.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * sd / math.sqrt(len(v))
    return mean, mean - half, mean + half, sd


def run_timings(result: RunResult) -> dict[str, Any]:
    """What every study's summary says of a run's cost: jobs, jobs computed by this invocation,
    its wall time, the job time of all records, and the devices and CPU thread counts they name
    (more than one of either: the run was resumed elsewhere)."""
    recs = result.records.values()
    return {
        "jobs": len(result.records),
        "computed": result.computed,
        "wall_seconds": result.wall_seconds,
        "job_seconds": float(sum(r["seconds"] for r in recs)),
        "devices": sorted({str(r["result"]["device"]) for r in recs if "device" in r["result"]}),
        "threads": sorted({r["threads"] for r in recs}),
    }


def run_info(result: RunResult, timings: dict[str, Any]) -> dict[str, Any]:
    """The run's identity for a summary: gscfast version, engine, threads per job, ``timings``
    and the machine."""
    from .. import __version__

    return {
        "version": __version__,
        "engine": result.engine,
        "threads": result.threads,
        "timings": timings,
        "machine": describe_machine(),
    }


def run_command(
    study: Study,
    args: argparse.Namespace,
    write: Callable[[RunResult], dict[str, Path]],
    out: str | Path | None = None,
) -> int:
    """Run ``study`` with the shared runner options of ``args`` (``add_runner_arguments``) into
    ``out`` (default ``args.out``); on a complete run call ``write(result)`` and list the files it
    wrote. Returns the command's exit status (130 when interrupted: finished jobs are kept)."""
    out = Path(args.out if out is None else out)
    check_command(args, out)
    try:
        result = run(
            study,
            out,
            resume=args.resume,
            engine=args.engine,
            address=args.address,
            num_cpus=args.num_cpus,
            threads=args.threads,
            quiet=args.quiet,
            max_jobs=args.max_jobs,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished jobs are saved in {out}; continue with the same command "
            "and --resume"
        )
        return 130
    if not result.complete:
        print(
            f"stopped after {result.computed} new jobs ({len(result.records)} of "
            f"{len(study.jobs)} done); continue with the same command and --resume"
        )
        return 0
    paths = write(result)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
