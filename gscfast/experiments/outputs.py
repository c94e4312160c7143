"""What every study shares around the runner, so that a study writes only what is its own:

- its command: the shared options (``add_study_arguments``, ``add_data_arguments``), the
  configuration from the options with refusals as usage errors (``config_from_args``,
  ``usage_errors``), option checks before anything is written (``check_command``), and the run of
  one or more phases with the report of an interrupted or partial run (``run_command``,
  ``run_phases``);
- its outputs: one recipe (``write_files``: results.json first, the study's list of ``Output``\\ s,
  summary.md last, each file atomically), strict JSON, CSV numbers, figures, and the summary
  pieces every study prints (machine, timings, configuration);
- checks of option values and of job records read back (``check_integers``, ``check_number``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    add_runner_arguments,
    check_out_dir,
    check_run_options,
    run,
)

__all__ = [
    "Output",
    "PhaseRunner",
    "add_data_arguments",
    "add_study_arguments",
    "check_backend",
    "check_command",
    "check_device",
    "check_integers",
    "check_number",
    "check_numbers",
    "config_from_args",
    "config_section",
    "expand_names",
    "figure_files",
    "fmt",
    "invocation_line",
    "json_file",
    "json_safe",
    "mean_or_none",
    "num",
    "pyplot",
    "resolve_device",
    "resolve_dtype",
    "run_command",
    "run_info",
    "run_phases",
    "run_timings",
    "save_figure",
    "sci",
    "t_interval",
    "text_file",
    "usage_errors",
    "write_files",
    "write_json",
]


def add_study_arguments(
    p: argparse.ArgumentParser,
    name: str,
    *,
    device: str = "auto",
    dtype: str | None = "float32",
    backend: str | None = "the measurements",
) -> None:
    """The options every study's command shares, after its own: ``--out`` (default
    ``results/<name>``), ``--seed``, ``--device``, unless None ``--dtype`` (default ``dtype``) and
    ``--backend`` (help: what the backend computes), and the runner's (``add_runner_arguments``)."""
    p.add_argument(
        "--out", default=f"results/{name}", help="results directory (default %(default)s)"
    )
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
    add_runner_arguments(p)


def add_data_arguments(p: argparse.ArgumentParser, archives: str) -> None:
    """``--data-dir`` (the folder of ``archives``, default ``data``), ``--data-md5`` and
    ``--download``: the options of a study that trains on an official dataset archive."""
    p.add_argument("--data-dir", default="data", help=f"folder of {archives} (default data)")
    p.add_argument(
        "--data-md5",
        default=None,
        help="expected MD5 of the archive (default: the official one; for generated "
        "archives, see gscfast.data.cifar.write_fake_archive)",
    )
    p.add_argument(
        "--download", action="store_true", help="download the official archive if missing"
    )


@contextmanager
def usage_errors(*types: type[Exception]) -> Iterator[None]:
    """Turn an exception of ``types`` (default ``ValueError``: a bad option value) into
    ``UsageError`` with the same message, which the ``gscfast`` command reports as
    ``gscfast <study>: error: ...`` with exit status 2."""
    caught = types or (ValueError,)
    try:
        yield
    except caught as e:
        raise UsageError(str(e)) from e


def config_from_args(
    make_config: Callable[..., dict[str, Any]], args: argparse.Namespace, **options: Any
) -> dict[str, Any]:
    """``make_config`` of a study's command line: each parameter of ``make_config`` that names an
    option of ``args`` takes its value, ``options`` give the others (an option spelt otherwise,
    e.g. ``gsc=not args.no_gsc``); a refused value is a ``UsageError`` (``usage_errors``)."""
    params = inspect.signature(make_config).parameters
    kwargs = {k: getattr(args, k) for k in params if hasattr(args, k)}
    with usage_errors():
        return make_config(**{**kwargs, **options})


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


def check_integers(*checks: tuple[Any, ...], optional: Collection[str] = ()) -> None:
    """Raise ``ValueError`` naming the first option of ``checks``, ``(name, value, least)`` or
    ``(name, value, least, why)``, whose value is not an integer (never a ``bool``) ``>= least``
    (``why``: appended to the message); an option named in ``optional`` may be None."""
    for name, value, least, *why in checks:
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}{''.join(why)}")


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` unless ``backend`` is ``"auto"`` or a gscfast backend's name."""
    from ..backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}"
        )


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


def config_section(config: dict[str, Any]) -> list[str]:
    """A summary's ``## Configuration`` section (lines): the configuration as indented JSON."""
    return ["## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]


def invocation_line(info: dict[str, Any]) -> str:
    """A summary's line on this invocation (``run_info``): jobs computed, engine, threads, wall
    time."""
    t = info["timings"]
    return (
        f"- This invocation: {t['computed']} jobs computed with engine `{info['engine']}` "
        f"({info['threads']} CPU threads per job), wall time {t['wall_seconds']:.1f} s."
    )


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


@dataclass(frozen=True)
class Output:
    """Files of a study's outputs written by one producer: ``write(paths)`` writes each of
    ``names`` (in the results directory) atomically. Made by ``text_file``, ``json_file`` and
    ``figure_files``."""

    names: tuple[str, ...]
    write: Callable[[list[Path]], None]


def text_file(name: str, text: str) -> Output:
    """The file ``name`` holding ``text`` (a CSV table, ...)."""
    return Output((name,), lambda paths: atomic_write(paths[0], text))


def json_file(name: str, obj: Any) -> Output:
    """The file ``name`` holding ``obj`` as ``write_json`` writes it."""
    return Output((name,), lambda paths: write_json(paths[0], obj))


def figure_files(stem: str, plot: Callable[[list[Path]], None]) -> Output:
    """``stem.png`` and ``stem.pdf``, written by ``plot(paths)`` (which ends in ``save_figure``)."""
    return Output((f"{stem}.png", f"{stem}.pdf"), plot)


# What results.json may carry besides the study's aggregate, always in this order.
_RESULTS_EXTRAS = ("timings", "seconds")


def write_files(
    out: str | Path,
    result: RunResult,
    results: dict[str, Any],
    files: Iterable[Output],
    summary: Callable[[dict[str, Any], dict[str, Any]], str],
    *,
    timings: dict[str, Any] | None = None,
    extras: Iterable[str] = (),
) -> dict[str, Path]:
    """Every study's output recipe from a complete run: ``results.json`` (the aggregate
    ``results``, the gscfast version and, as ``extras`` names them, the run's ``timings`` and
    every job's ``seconds``), then each of ``files`` in order, then ``summary.md`` from
    ``summary(results, run_info)`` (last: its presence says the outputs are complete). ``timings``
    default ``run_timings(result)``. Each file is written atomically; returns file name -> path
    in the order written."""
    out = Path(out)
    extras = tuple(extras)
    unknown = sorted(set(extras) - set(_RESULTS_EXTRAS))
    if unknown:
        raise ValueError(f"results.json extras must be among {_RESULTS_EXTRAS}, got {unknown}")
    info = run_info(result, run_timings(result) if timings is None else timings)
    values = {
        "timings": info["timings"],
        "seconds": {k: r["seconds"] for k, r in result.records.items()},
    }
    full = {
        **results,
        "gscfast_version": info["version"],
        **{k: values[k] for k in _RESULTS_EXTRAS if k in extras},
    }
    paths: dict[str, Path] = {}
    for output in (json_file("results.json", full), *files):
        output.write([out / name for name in output.names])
        paths.update((name, out / name) for name in output.names)
    atomic_write(out / "summary.md", summary(results, info))
    paths["summary.md"] = out / "summary.md"
    return paths


class _Stopped(Exception):
    """A phase of a command stopped at ``--max-jobs``; the message says how to continue."""


# run_phase(study, out, what) of run_phases: run ``study`` into ``out`` (``what``: the phase's
# name in messages, e.g. "search "), return its complete result or stop the command.
PhaseRunner = Callable[[Study, Path, str], RunResult]


def run_phases(
    args: argparse.Namespace,
    body: Callable[[PhaseRunner], dict[str, Path]],
    out: str | Path | None = None,
    *,
    kept: str = "finished jobs are",
) -> int:
    """A study's command that runs one or more studies (phases) with the shared runner options of
    ``args`` (``add_runner_arguments``; ``--max-jobs`` counts the jobs of all phases), then writes
    its outputs: ``body(run_phase)`` runs each phase with ``run_phase(study, dir, what)`` and
    returns the files it wrote, which are listed. A phase stopped by ``--max-jobs`` ends the
    command (status 0) with how to continue; an interrupt, status 130 (``kept``: what is saved in
    ``out``, default ``args.out``). Options are checked (``check_command``) before anything."""
    out = Path(args.out if out is None else out)
    check_command(args, out)
    budget = args.max_jobs

    def run_phase(study: Study, where: Path, what: str = "") -> RunResult:
        nonlocal budget
        result = run(
            study,
            where,
            resume=args.resume,
            engine=args.engine,
            address=args.address,
            num_cpus=args.num_cpus,
            threads=args.threads,
            quiet=args.quiet,
            max_jobs=budget,
        )
        if budget is not None:
            budget -= result.computed
        if not result.complete:
            raise _Stopped(
                f"stopped after {result.computed} new {what}jobs ({len(result.records)} of "
                f"{len(study.jobs)} done); continue with the same command and --resume"
            )
        return result

    try:
        paths = body(run_phase)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {kept} saved in {out}; continue with the same command and --resume")
        return 130
    except _Stopped as e:
        print(e)
        return 0
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def run_command(
    study: Study,
    args: argparse.Namespace,
    write: Callable[[RunResult], dict[str, Path]],
    out: str | Path | None = None,
) -> int:
    """``run_phases`` of one study: run ``study`` into ``out`` (default ``args.out``); on a
    complete run call ``write(result)``. Returns the command's exit status."""
    where = Path(args.out if out is None else out)
    return run_phases(args, lambda run_phase: write(run_phase(study, where, "")), where)
