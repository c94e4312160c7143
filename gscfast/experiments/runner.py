"""The one runner for gscfast's studies: a list of jobs, one result file per finished job, resume.

A study is a name, a JSON-able ``config`` (everything that changes its numbers), a list of
``Job``\\ s and a module-level job function ``fn(config, spec) -> dict`` (JSON-able). ``run``
executes the jobs that are not done yet and returns every job's record; the study then
aggregates them and writes its outputs. A results directory looks like::

    DIR/manifest.json       format, study name, config, gscfast version (written once)
    DIR/jobs/<key>.json     one record per finished job, written atomically (temp file + os.replace)
    DIR/...                 the study's outputs (figures, tables), regenerated from jobs/

Guarantees:

- Nothing finished is lost: each record is on disk as soon as its job completes, so an interrupted
  run continues with ``resume=True`` and, because final outputs are always computed from the
  records read back from disk, gives bit-for-bit the same numbers as an uninterrupted run.
- No mixing: a non-empty directory is used only with ``resume=True`` and only if its manifest
  matches this run exactly (study, config, gscfast version, format); a missing or corrupted
  manifest, a corrupted record or a record of another job or run is refused with
  ``ResultsDirError`` (nothing is written then). A directory that holds no finished job and
  nothing else (only a manifest and an empty ``jobs/``: a run stopped before its first job) is
  taken as empty, its manifest replaced.
- Refused before anything is written: bad runner options (``check_run_options``) and a directory
  that cannot be created or written (``check_out_dir``). A run that fails before its first record
  removes the manifest and folders it created; a record that cannot be written stops the run
  with ``ResultsDirError`` (never computed and dropped silently).
- Engines: ``"local"`` runs jobs one after another in this process; ``"ray"`` runs them as Ray
  tasks (``address`` for an existing cluster, else a local instance with ``num_cpus`` CPUs), one
  GPU per task when the cluster has GPUs. Every job runs with the same number of CPU threads
  (``threads``, default this process's torch thread count), because CPU reductions round
  differently with different thread counts; with equal ``threads`` the two engines give identical
  numbers.
- Seeds: ``job_seed`` derives a job's seeds from the run's seed and the job's identity with a
  stable hash, so numbers do not depend on job order, engine or resume.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..io import atomic_write

__all__ = [
    "ENGINES",
    "FORMAT",
    "EngineError",
    "Job",
    "ResultsDirError",
    "RunResult",
    "Study",
    "UsageError",
    "add_runner_arguments",
    "atomic_write",
    "check_out_dir",
    "check_run_options",
    "job_seed",
    "run",
]

FORMAT = "gscfast-results/1"
ENGINES = ("local", "ray")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class ResultsDirError(RuntimeError):
    """A results directory that cannot be used: foreign, corrupted, or holding a different run."""


class EngineError(RuntimeError):
    """An engine that cannot run here (e.g. Ray not installed)."""


class OutdatedRecord(ValueError):
    """A study's ``check`` refuses a record written by an older gscfast (its message says how to
    recompute); reported as such, not as corruption."""


class UsageError(ValueError):
    """Invalid options of a study's command."""


@dataclass(frozen=True)
class Job:
    """One unit of work: ``key`` names its record file ``jobs/<key>.json``; ``spec`` (JSON-able)
    is what the job function gets besides the study's config."""

    key: str
    spec: dict[str, Any]


@dataclass
class Study:
    """What ``run`` needs to know about a study.

    Attributes:
        name: the study's name (stored in the manifest; e.g. ``"gaussian"``).
        config: JSON-able options that determine the numbers; ``--resume`` must match it exactly.
        jobs: the jobs, in the order they are run and reported.
        fn: ``fn(config, spec) -> dict``, JSON-able; a module-level function (Ray pickles it by
            reference), deterministic given its arguments.
        check: optional ``check(config, spec, result)`` raising ``ValueError`` on a malformed
            result, used when records are read back.
        gpu: whether a job uses a GPU when its machine has one (the Ray engine then gives each
            task one GPU).
        prepare: optional ``prepare(config, specs) -> str | None``, called once before the
            local engine runs the jobs ``specs`` (e.g. to compile their kernels side by side,
            ``numba_backend.compile_ahead``); it must not change any number. A line it returns
            is shown above the progress bar (not with ``quiet``).
    """

    name: str
    config: dict[str, Any]
    jobs: list[Job]
    fn: Callable[[dict, dict], dict]
    check: Callable[[dict, dict, dict], None] | None = None
    gpu: bool = False
    prepare: Callable[[dict, list[dict]], str | None] | None = None

    def __post_init__(self) -> None:
        keys = [j.key for j in self.jobs]
        bad = [k for k in keys if not _KEY.fullmatch(k)]
        if bad:
            raise ValueError(f"job keys must match {_KEY.pattern} (they name files), got {bad[:3]}")
        if len(set(keys)) != len(keys):
            raise ValueError("job keys must be unique")


@dataclass
class RunResult:
    """What ``run`` returns.

    Attributes:
        records: ``key -> record`` for every finished job, in job order; a record holds ``spec``,
            ``result`` (as read back from disk), ``seconds`` (the job function's wall time),
            ``threads`` and ``engine``.
        complete: whether every job is done.
        computed: jobs computed by this call.
        wall_seconds: this call's wall time.
        engine: the engine this call used.
    """

    records: dict[str, dict[str, Any]]
    complete: bool
    computed: int
    wall_seconds: float
    engine: str
    threads: int
    manifest: dict[str, Any] = field(default_factory=dict)


def job_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and JSON-able ``parts`` (e.g. an architecture name and a dataset
    index) by SHA-256: stable across processes and Python versions (unlike the salted ``hash``)."""
    text = json.dumps([int(seed), *parts], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def _canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(obj))


def _gscfast_version() -> str:
    from .. import __version__

    return __version__


def _manifest(study: Study) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "study": study.name,
        "gscfast_version": _gscfast_version(),
        "config": _canonical(study.config),
        "jobs": len(study.jobs),
    }


def _fingerprint(manifest: dict[str, Any]) -> str:
    """Identifies a run (its manifest); every record carries it."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _describe_difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    diffs = []
    for key in ("format", "study", "gscfast_version"):
        if found.get(key) != wanted[key]:
            diffs.append(f"{key} {found.get(key)!r} there, {wanted[key]!r} here")
    fc, wc = found.get("config"), wanted["config"]
    if isinstance(fc, dict):
        for key in sorted(set(fc) | set(wc)):
            if fc.get(key, "<absent>") != wc.get(key, "<absent>"):
                diffs.append(
                    f"{key} {fc.get(key, '<absent>')!r} there, {wc.get(key, '<absent>')!r} here"
                )
    elif fc != wc:
        diffs.append("config is not a mapping there")
    if not diffs and found != wanted:
        diffs.append("the manifest has other fields")
    return "; ".join(diffs)


def _is_temp(name: str) -> bool:
    """A temp file of ``atomic_write`` (a write interrupted before its ``os.replace``)."""
    return name.startswith(".") and ".tmp-" in name


def _holds_nothing(out: Path) -> bool:
    """Whether ``out`` (a directory) holds at most a manifest and a ``jobs/`` without records:
    a run stopped before its first job, with nothing to lose."""
    entries = {p.name for p in out.iterdir()}
    if not entries <= {"manifest.json", "jobs"} or (out / "manifest.json").is_dir():
        return False
    jobs = out / "jobs"
    return not jobs.exists() or (jobs.is_dir() and all(_is_temp(p.name) for p in jobs.iterdir()))


def _prepare(study: Study, out: Path, resume: bool) -> tuple[dict[str, Any], bool]:
    """Check or create ``out`` and its manifest; returns the manifest and whether this call
    (re)started the run. Writes nothing on refusal."""
    wanted = _manifest(study)
    check_out_dir(out)
    try:
        entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
        fresh = not entries or _holds_nothing(out)
    except OSError as e:
        raise ResultsDirError(f"{out} cannot be read ({e.strerror or e})") from e
    if not fresh and not resume:
        raise ResultsDirError(
            f"{out} is not empty; pass --resume to continue the run stored there (same study and "
            f"options), or choose another --out"
        )
    if fresh:
        try:
            (out / "jobs").mkdir(parents=True, exist_ok=True)
            for p in (out / "jobs").iterdir():
                p.unlink()  # temp files of interrupted writes
            atomic_write(out / "manifest.json", json.dumps(wanted, indent=2) + "\n")
        except OSError as e:
            raise ResultsDirError(f"{out} cannot be written ({e.strerror or e})") from e
        return wanted, True
    path = out / "manifest.json"
    if not path.is_file():
        raise ResultsDirError(
            f"{out} has no manifest.json, so it is not a gscfast results directory; refusing to "
            f"write into it (found: {', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})"
        )
    try:
        found = json.loads(path.read_text())
        if not isinstance(found, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ResultsDirError(f"{path} is corrupted ({e}); refusing to use {out}") from e
    if found != wanted:
        raise ResultsDirError(
            f"{out} holds a different run ({_describe_difference(found, wanted)}); use the same "
            f"options to resume it, or choose another --out"
        )
    (out / "jobs").mkdir(exist_ok=True)
    return wanted, False


def _writable(d: Path) -> str | None:
    """None if this process can create files in the directory ``d``, else why not (tried with a
    probe file: permission bits do not tell, e.g. for root or a read-only file system)."""
    probe = d / f".write-test.tmp-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        return e.strerror or str(e)
    probe.unlink()
    return None


def check_out_dir(out: str | Path) -> None:
    """Refuse with ``ResultsDirError``, naming the path and the problem, a results directory that
    cannot be created or written: a path under a file, a file, a directory (or its ``jobs/``) in
    which no file can be created. Leaves nothing behind (a probe file is created and removed)."""
    out = Path(out)
    existing = out
    while not (existing.exists() or existing.is_symlink()) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        if existing == out:
            raise ResultsDirError(f"{out} exists and is not a directory")
        raise ResultsDirError(f"{out} cannot be created: {existing} is not a directory")
    why = _writable(existing)
    if why is not None:
        raise ResultsDirError(
            f"{out} cannot be written: no file can be created in {existing} ({why})"
            if existing == out
            else f"{out} cannot be created: no folder can be created in {existing} ({why})"
        )
    jobs = out / "jobs"
    if existing == out and (jobs.exists() or jobs.is_symlink()):
        if not jobs.is_dir():
            raise ResultsDirError(f"{jobs} is not a directory (the jobs' records go there)")
        why = _writable(jobs)
        if why is not None:
            raise ResultsDirError(
                f"{out} cannot be written: no file can be created in {jobs} ({why}), "
                f"where each finished job's record goes"
            )


def _load_records(
    study: Study, out: Path, fingerprint: str, clean: bool = False
) -> dict[str, dict[str, Any]]:
    """Every finished job's record in ``out/jobs``, validated; refuses anything it cannot vouch for.
    ``clean`` (only under the directory's lock) removes temp files of interrupted writes."""
    specs = {j.key: _canonical(j.spec) for j in study.jobs}
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((out / "jobs").iterdir()):
        if _is_temp(path.name):
            if clean:
                path.unlink()  # a write interrupted before its os.replace: never a result
            continue
        key = path.name[:-5] if path.name.endswith(".json") else None
        if key not in specs:
            raise ResultsDirError(
                f"{path} is not a job of this run; refusing to mix it in (remove it if it is stray)"
            )
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            if rec.get("format") != FORMAT or rec.get("run") != fingerprint:
                raise ValueError("it belongs to another run")
            if rec.get("key") != key or rec.get("spec") != specs[key]:
                raise ValueError("its job does not match its file name")
            if not isinstance(rec.get("result"), dict) or not isinstance(
                rec.get("seconds"), (int, float)
            ):
                raise ValueError("missing result or seconds")
            if study.check is not None:
                study.check(study.config, rec["spec"], rec["result"])
        except OutdatedRecord as e:
            raise ResultsDirError(f"{path} cannot be used: {e}") from e
        except (ValueError, UnicodeDecodeError, TypeError, KeyError) as e:
            raise ResultsDirError(
                f"{path} is corrupted ({e}); delete it to recompute that job, then --resume"
            ) from e
        found[key] = rec
    return {j.key: found[j.key] for j in study.jobs if j.key in found}


@contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Run with exactly ``threads`` torch (and numba) CPU threads; restored afterwards."""
    old = torch.get_num_threads()
    numba: ModuleType | None
    try:
        numba = importlib.import_module("numba")
    except ImportError:  # pragma: no cover - numba is a dependency
        numba = None
    old_nb = numba.get_num_threads() if numba is not None else None
    torch.set_num_threads(threads)
    if numba is not None:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if numba is not None:
            numba.set_num_threads(old_nb)


def _execute(
    fn: Callable[[dict, dict], dict], config: dict, spec: dict, threads: int
) -> tuple[dict, float]:
    """One job with ``threads`` CPU threads: ``(result, seconds)``. Also what Ray tasks run."""
    with thread_limit(threads):
        t0 = time.perf_counter()
        result = fn(config, spec)
        return result, time.perf_counter() - t0


def _local(
    study: Study, todo: list[Job], threads: int, **_: Any
) -> Iterator[tuple[Job, tuple[dict, float]]]:
    for job in todo:
        yield job, _execute(study.fn, study.config, job.spec, threads)


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise EngineError(
            "--engine ray needs Ray, which is not installed here: pip install 'gscfast[ray]' "
            "(or pip install 'ray>=2.9'), or use --engine local"
        ) from e
    return ray


def _ray(
    study: Study,
    todo: list[Job],
    threads: int,
    address: str | None = None,
    num_cpus: int | None = None,
) -> Iterator[tuple[Job, tuple[dict, float]]]:
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    try:
        resources = ray.cluster_resources()
        if study.gpu and resources.get("GPU", 0) >= 1:
            options = {"num_cpus": 1, "num_gpus": 1}  # the job function picks the task's GPU
        else:
            # Reserve the CPUs the job's threads use (capped so that a task can be scheduled).
            options = {"num_cpus": max(1, min(threads, int(resources.get("CPU", 1))))}
        task = ray.remote(_execute).options(**options)
        config = ray.put(study.config)
        pending = {task.remote(study.fn, config, job.spec, threads): job for job in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                yield pending.pop(ref), ray.get(ref)
    finally:
        if started:
            ray.shutdown()


# Engine name -> (study, jobs to do, threads, address=, num_cpus=) -> finished (job, (result, s)).
_ENGINES: dict[str, Callable[..., Iterator[tuple[Job, tuple[dict, float]]]]] = {
    "local": _local,
    "ray": _ray,
}


def run(
    study: Study,
    out: str | Path,
    *,
    resume: bool = False,
    engine: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    threads: int | None = None,
    quiet: bool = False,
    max_jobs: int | None = None,
) -> RunResult:
    """Run ``study``'s unfinished jobs into ``out`` and return every finished job's record.

    Args:
        study: the study.
        out: the results directory (created if missing).
        resume: continue the run stored in a non-empty ``out`` (its manifest must match).
        engine: ``"local"`` or ``"ray"``.
        address: Ray cluster address (``engine="ray"``); default a local Ray instance.
        num_cpus: CPUs of the local Ray instance (default: all).
        threads: CPU threads per job (default ``torch.get_num_threads()``); numbers are bit-for-bit
            reproducible for equal ``threads``.
        quiet: no progress bar.
        max_jobs: compute at most this many jobs, then return (``complete`` may be False); for
            tests and for running a study in slices.

    Raises:
        UsageError: an option has a bad value (``check_run_options``); nothing is written.
        ResultsDirError: ``out`` cannot be used (see the module docstring).
        EngineError: the engine cannot run here.
    """
    check_run_options(
        engine=engine, address=address, num_cpus=num_cpus, threads=threads, max_jobs=max_jobs
    )
    if engine == "ray":
        _import_ray()  # fail before touching the directory
    threads = threads or torch.get_num_threads()
    out = Path(out)
    t0 = time.perf_counter()
    created = not out.exists()
    manifest, fresh = _prepare(study, out, resume)
    fingerprint = _fingerprint(manifest)
    try:
        _load_records(study, out, fingerprint)  # refuse a spoiled directory before taking it
        with _lock(out):
            records = _load_records(study, out, fingerprint, clean=True)
            computed = _run_jobs(
                study,
                out,
                records,
                fingerprint,
                engine,
                threads,
                address,
                num_cpus,
                quiet,
                max_jobs,
            )
            # Always hand back what is on disk, so resumed and uninterrupted runs give the same numbers.
            records = _load_records(study, out, fingerprint)
    except BaseException:
        if fresh:
            _unstart(out, created)
        raise
    return RunResult(
        records,
        len(records) == len(study.jobs),
        computed,
        time.perf_counter() - t0,
        engine,
        threads,
        manifest,
    )


def _unstart(out: Path, created: bool) -> None:
    """Undo what ``_prepare`` wrote for a run that failed before its first record (a crash or a
    refusal in its first job), so that the corrected command is not refused as another run;
    anything else found in ``out`` (a record, a checkpoint) keeps it all."""
    try:
        if not _holds_nothing(out):
            return
        (out / "manifest.json").unlink(missing_ok=True)
        if (out / "jobs").exists():
            for p in (out / "jobs").iterdir():
                p.unlink()
            (out / "jobs").rmdir()
        if created:
            out.rmdir()
    except OSError:  # best effort: a directory left behind holds nothing and is taken as empty
        pass


def check_run_options(
    *,
    engine: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    threads: int | None = None,
    max_jobs: int | None = None,
    cli: bool = False,
) -> None:
    """Raise ``UsageError`` naming the option unless ``run``'s options are valid: a known engine,
    ``threads`` and ``num_cpus`` positive integers, ``max_jobs`` an integer >= 0, ``address`` and
    ``num_cpus`` only for the Ray engine and not together. ``cli``: name them as the command-line
    options (``--num-cpus``) rather than as ``run``'s arguments."""

    def name(k: str) -> str:
        return "--" + k.replace("_", "-") if cli else k

    if engine not in _ENGINES:
        raise UsageError(f"{name('engine')} must be one of {', '.join(ENGINES)}, got {engine!r}")
    for k, v, least in (
        ("threads", threads, 1),
        ("num_cpus", num_cpus, 1),
        ("max_jobs", max_jobs, 0),
    ):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise UsageError(f"{name(k)} must be an integer >= {least}, got {v!r}")
    if address is not None and (
        not isinstance(address, str) or not address.strip() or any(c.isspace() for c in address)
    ):
        raise UsageError(
            f"{name('address')} must be a Ray cluster address (e.g. auto, "
            f"ray://host:10001 or host:6379), got {address!r}"
        )
    for k, given in (("address", address), ("num_cpus", num_cpus)):
        if given is not None and engine != "ray":
            raise UsageError(
                f"{name(k)} applies to the Ray engine only ({name('engine')} ray), not to {engine}"
            )
    if address is not None and num_cpus is not None:
        raise UsageError(
            f"{name('num_cpus')} sizes a local Ray instance; with {name('address')} "
            f"the cluster's CPUs are used"
        )


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` so that two processes never run into the same directory at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    path = out / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise ResultsDirError(
                f"{out} is in use by another gscfast process "
                f"(pid {f.read().strip() or '?'}); wait for it to finish"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_jobs(
    study: Study,
    out: Path,
    records: dict,
    fingerprint: str,
    engine: str,
    threads: int,
    address: str | None,
    num_cpus: int | None,
    quiet: bool,
    max_jobs: int | None,
) -> int:
    """Compute the unfinished jobs, writing each record as it completes; returns how many."""
    todo = [j for j in study.jobs if j.key not in records]
    if max_jobs is not None:
        todo = todo[: max(0, max_jobs)]
    computed = 0
    bar = _progress(len(study.jobs), len(records), study.name, quiet)
    if engine == "local" and study.prepare is not None and todo:
        note = study.prepare(study.config, [job.spec for job in todo])
        if note and not quiet:
            (bar.write if bar is not None else print)(note, file=sys.stderr)
    try:
        for job, (result, seconds) in _ENGINES[engine](
            study, todo, threads, address=address, num_cpus=num_cpus
        ):
            rec = {
                "format": FORMAT,
                "run": fingerprint,
                "key": job.key,
                "spec": _canonical(job.spec),
                "result": result,
                "seconds": seconds,
                "threads": threads,
                "engine": engine,
            }
            path = out / "jobs" / f"{job.key}.json"
            try:
                atomic_write(path, json.dumps(rec) + "\n")
            except OSError as e:
                raise ResultsDirError(
                    f"the record of job {job.key} could not be written to {path} ({e.strerror or e}), "
                    f"so its result is lost; make {out / 'jobs'} writable (or free space), then run "
                    f"the same command with --resume"
                ) from e
            computed += 1
            if bar is not None:
                bar.set_postfix_str(job.key, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return computed


def _progress(total: int, done: int, name: str, quiet: bool):
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(
            f"{name}: {done}/{total} jobs done (pip install tqdm for a progress bar)",
            file=sys.stderr,
        )
        return None
    return tqdm(
        total=total,
        initial=done,
        desc=name,
        unit="job",
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
    )


def add_runner_arguments(parser) -> None:
    """The options every study's command shares (``--out`` is the study's own)."""
    g = parser.add_argument_group("running")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run stored in --out (same study and options); a complete run "
        "only regenerates the outputs. Without it a non-empty --out is refused",
    )
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: jobs one after another in this process; ray: jobs as Ray tasks "
        "(pip install 'gscfast[ray]'), one GPU per task when there are GPUs",
    )
    g.add_argument(
        "--address",
        default=None,
        help="address of an existing Ray cluster (--engine ray); default: a local instance",
    )
    g.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray instance (--engine ray without --address; default: all)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"CPU threads per job (default: torch's, here {torch.get_num_threads()}); numbers "
        "are reproducible bit for bit for equal --threads",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--max-jobs",
        type=int,
        default=None,
        help="compute at most N jobs, then stop (continue with --resume)",
    )
