"""What the runner, the study commands and the training checkpoints refuse (issue 11): a job record
with something else than a number, a results directory that cannot be created or written, a bad
option value, a damaged or malicious checkpoint. Each is a one-line error that names what is wrong,
given before anything is written or computed; nothing computed is dropped silently, and a run
stopped before its first job never blocks the corrected command."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from gscfast.__main__ import main
from gscfast.data.cifar import write_fake_archive
from gscfast.experiments import cifar, ghost, runner, shattered, vgg
from gscfast.experiments.outputs import check_number, check_numbers
from gscfast.experiments.training import (
    CheckpointError,
    EpochLoop,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    save_training_state,
)

GHOST = [
    "--variants",
    "plain-relu",
    "--depth",
    "4",
    "--width",
    "8",
    "--batch",
    "2",
    "--repeats",
    "2",
    "--chunk",
    "1",
    "--backend",
    "torch",
    "--threads",
    "1",
    "--quiet",
]


def ghost_cmd(out: Path, *extra: str) -> int:
    return main(["ghost", "--out", str(out), *GHOST, *extra])


def _error(capsys) -> str:
    """The command's stderr, which must be one error line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gscfast "), err
    return err


# ----------------------------------------------------------------------------- numbers in records
def test_check_number():
    check_number(1, "x")
    check_number(-2.5, "x")
    for bad in (True, False, "1", [1], {}, None):
        with pytest.raises(ValueError, match="x is not a number"):
            check_number(bad, "x")
    for v in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="x is not finite"):
            check_number(v, "x")
        check_number(v, "x", finite=False)
    check_number(None, "x", none=True)
    with pytest.raises(ValueError, match="not a number"):
        check_number(True, "x", none=True, finite=False)
    with pytest.raises(ValueError, match="x is not an integer"):
        check_number(1.0, "x", integer=True)
    check_numbers([1, 2.0, None], "v", 3, none=True)
    with pytest.raises(ValueError, match=r"v\[1\] is not a number"):
        check_numbers([1, True, 3], "v", 3)
    with pytest.raises(ValueError, match="v is not a list of 2 numbers"):
        check_numbers([1, 2, 3], "v", 2)


def _json(obj):
    return json.loads(json.dumps(obj))


def _ghost_job(tmp_path):
    config = ghost.make_config(
        variants=["plain-relu"], repeats=1, chunk=1, width=4, depth=4, batch=2, backend="torch"
    )
    spec = ghost.make_study(config).jobs[0].spec
    return (
        ghost.check_result,
        config,
        spec,
        _json(ghost.run_job(config, spec)),
        [("sum_sq", 1), ("sum_norm", 0), ("repeats",), ("gsc_moments", "sq_grad", 2)],
    )


def _shattered_job(tmp_path):
    config = shattered.make_config(
        archs=["ReLU-2"], ensemble=2, chunk=2, points=4, width=4, device="cpu"
    )
    spec = shattered.make_study(config).jobs[0].spec
    return (
        shattered.check_result,
        config,
        spec,
        _json(shattered.run_job(config, spec)),
        [("gradients", 1, 2)],
    )


def _cifar_job(tmp_path):
    config = cifar.make_config(
        dataset="digits",
        archs=["SeLU"],
        lrs=[0.1],
        epochs=1,
        search_epochs=1,
        depth=2,
        width=8,
        batch_size=500,
        ed_samples=0,
        ed_every=0,
        backend="torch",
        device="cpu",
    )
    study = cifar.make_final_study(config, {"SeLU": 0.1}, tmp_path)
    spec = study.jobs[0].spec
    return (
        cifar.check_result,
        study.config,
        spec,
        _json(cifar.train_job(study.config, spec)),
        [
            ("final_error",),
            ("final_loss",),
            ("lr",),
            ("epochs_done",),
            ("history", 1, "train_error"),
            ("history", 0, "gsc", 1),
        ],
    )


def _vgg_job(tmp_path):
    md5 = write_fake_archive(tmp_path, "cifar100", "python", n_train=30, n_test=10, seed=3)
    config = vgg.make_config(
        archs=["VGG08"],
        epochs=1,
        batch_size=10,
        filters=2,
        val_size=10,
        flow_every=1,
        data_dir=str(tmp_path),
        data_md5=md5,
        device="cpu",
    )
    spec = vgg.make_study(config, tmp_path).jobs[0].spec
    result = _json(vgg.train_variant(config, spec))
    step = sorted(result["flow"]["records"])[0]
    name = result["flow"]["weights"][0]
    return (
        vgg.check_result,
        config,
        spec,
        result,
        [
            ("epochs_done",),
            ("test_acc",),
            ("history", 0, "train_loss"),
            ("history", 0, "lr"),
            ("flow", "records", step, "weights", name, "mean_abs"),
        ],
    )


@pytest.mark.parametrize(
    "make",
    [_ghost_job, _shattered_job, _cifar_job, _vgg_job],
    ids=["ghost", "shattered", "cifar", "vgg"],
)
def test_every_study_refuses_true_in_place_of_a_number(make, tmp_path, monkeypatch):
    """JSON's ``true`` reads back as Python's True, an int: each study's check must refuse it."""
    monkeypatch.setenv(
        "GSCFAST_BACKEND", "torch"
    )  # no JIT compilation (the Taylor curve's backend)
    with runner.thread_limit(1):
        check, config, spec, result, paths = make(tmp_path)
    check(config, spec, result)  # the job's own result passes
    for path in paths:
        bad = copy.deepcopy(result)
        leaf = bad
        for k in path[:-1]:
            leaf = leaf[k]
        assert isinstance(leaf[path[-1]], (int, float)) and not isinstance(leaf[path[-1]], bool), (
            path
        )
        leaf[path[-1]] = True
        with pytest.raises(ValueError, match="is not a number"):
            check(config, spec, bad)


def test_a_record_with_true_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert ghost_cmd(out) == 0
    p = out / "jobs" / "plain-relu.0001.json"
    rec = json.loads(p.read_text())
    rec["result"]["sum_sq"][0] = True
    p.write_text(json.dumps(rec))
    (out / "results.json").unlink()
    capsys.readouterr()
    assert ghost_cmd(out, "--resume") == 2
    err = _error(capsys)
    assert str(p) in err and "'sum_sq'[0] is not a number" in err and "delete it" in err
    assert not (out / "results.json").exists()


# ----------------------------------------------------------------------------- option values
BAD_OPTIONS = {  # options -> words of the message
    ("--threads", "-2"): "--threads must be an integer >= 1, got -2",
    ("--threads", "0"): "--threads must be an integer >= 1, got 0",
    ("--max-jobs", "-1"): "--max-jobs must be an integer >= 0",
    ("--num-cpus", "0"): "--num-cpus must be an integer >= 1",
    ("--num-cpus", "2"): "--num-cpus applies to the Ray engine only",
    ("--address", "auto"): "--address applies to the Ray engine only",
    ("--device", "nonsense"): "--device 'nonsense' is not a device",
    ("--device", "meta"): "--device meta holds no data",
    ("--backend", "nonsense"): "backend 'nonsense'",
}
if not torch.cuda.is_available():
    BAD_OPTIONS[("--device", "cuda")] = "--device cuda is not available here"


@pytest.mark.parametrize("option", BAD_OPTIONS, ids=" ".join)
def test_bad_option_values_are_refused_before_anything_is_written(option, tmp_path, capsys):
    out = tmp_path / "run"
    assert ghost_cmd(out, *option) == 2
    assert BAD_OPTIONS[option] in _error(capsys)
    assert not out.exists()
    assert ghost_cmd(out) == 0  # the corrected command is not refused as "a different run"


def test_cifar_and_vgg_check_the_options_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["cifar", "--out", str(out), "--dataset", "digits", "--threads", "-2", "--quiet"]) == 2
    )
    assert "--threads must be" in _error(capsys) and not out.exists()
    assert main(["cifar", "--out", str(out), "--dataset", "digits", "--backend", "nonsense"]) == 2
    assert "--backend 'nonsense' is unknown" in _error(capsys) and not out.exists()
    # vgg: refused before its data are looked for (there are none here)
    assert (
        main(["vgg", "--out", str(out), "--data-dir", str(tmp_path / "none"), "--device", "x"]) == 2
    )
    assert "--device 'x' is not a device" in _error(capsys) and not out.exists()


def test_run_checks_its_options(tmp_path):
    study = ghost.make_study(
        ghost.make_config(
            variants=["plain-relu"], repeats=1, chunk=1, width=4, depth=4, batch=2, backend="torch"
        )
    )
    for kw, words in (
        ({"threads": -2}, "threads must be an integer >= 1"),
        ({"max_jobs": True}, "max_jobs must be an integer"),
        ({"engine": "slurm"}, "engine must be one of local, ray"),
    ):
        with pytest.raises(ValueError, match=words):
            runner.run(study, tmp_path / "run", quiet=True, **kw)
        assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- runs that stop early
def test_a_run_that_crashes_before_its_first_job_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def crash(config, spec):
        raise RuntimeError("no such device")

    monkeypatch.setattr(ghost, "run_job", crash)
    with pytest.raises(RuntimeError, match="no such device"):
        ghost_cmd(out)
    assert not out.exists()


def test_a_run_that_crashes_after_a_job_keeps_it(tmp_path, monkeypatch):
    out, run_job, calls = tmp_path / "run", ghost.run_job, []

    def second_crashes(config, spec):
        if calls:
            raise RuntimeError("crash")
        calls.append(spec)
        return run_job(config, spec)

    monkeypatch.setattr(ghost, "run_job", second_crashes)
    with pytest.raises(RuntimeError, match="crash"):
        ghost_cmd(out)
    assert (out / "manifest.json").is_file() and len(list((out / "jobs").iterdir())) == 1
    monkeypatch.setattr(ghost, "run_job", run_job)
    assert ghost_cmd(out, "--seed", "1") == 2  # a finished job is never discarded
    assert ghost_cmd(out, "--seed", "1", "--resume") == 2
    assert ghost_cmd(out, "--resume") == 0


def test_a_directory_without_finished_jobs_is_taken_as_empty(tmp_path, capsys):
    """A run stopped before its first job (e.g. by an older gscfast) holds nothing to lose."""
    out = tmp_path / "run"
    assert ghost_cmd(out, "--max-jobs", "0") == 0
    assert sorted(p.name for p in out.iterdir()) == ["jobs", "manifest.json"]
    (out / "jobs" / ".plain-relu.0000.json.tmp-99").write_text("half a record")
    assert (
        ghost_cmd(out, "--seed", "1") == 0
    )  # other options, no --resume: the manifest is replaced
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 1
    assert sorted(p.name for p in (out / "jobs").iterdir()) == [
        "plain-relu.0000.json",
        "plain-relu.0001.json",
    ]
    (out / "other").write_text("x")  # anything else: not taken
    shutil.rmtree(out / "jobs")
    (out / "jobs").mkdir()
    capsys.readouterr()
    assert ghost_cmd(out, "--seed", "2") == 2 and "not empty" in _error(capsys)


# ----------------------------------------------------------------------------- results directories
@pytest.fixture
def shared_dir():
    """A folder an unprivileged user can use (pytest's tmp_path is root's alone when run as root)."""
    d = Path(tempfile.mkdtemp(prefix="gscfast-test-"))
    d.chmod(0o777)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir():
            p.chmod(0o777)
    shutil.rmtree(d)


@contextlib.contextmanager
def unprivileged(folder: Path):
    """Run as an ordinary user: root writes into read-only directories (the kernel's permission
    checks are what is tested, so root drops to ``nobody`` for a while) and what root wrote in
    ``folder`` becomes nobody's. Nobody cannot read root's Python installation, so a command
    refused at the same point first runs as root, to import everything it needs."""
    (folder.parent / "file").write_text("x")
    assert ghost_cmd(folder.parent / "file" / "sub") == 2
    if os.geteuid() != 0:
        yield
        return
    for p in [folder, *folder.rglob("*")] if folder.exists() else []:
        os.chown(p, 65534, 65534)
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_out_under_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert ghost_cmd(tmp_path / "file" / "sub") == 2
    err = _error(capsys)
    assert (
        f"--out {tmp_path / 'file' / 'sub'} cannot be created: {tmp_path / 'file'} is not a directory"
        in err
    )
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_out_is_a_usage_error(shared_dir, capsys, monkeypatch):
    ro = shared_dir / "ro"
    ro.mkdir(mode=0o555)
    ro.chmod(0o555)
    monkeypatch.setattr(ghost, "run_job", lambda *a: pytest.fail("computed for nothing"))
    with unprivileged(shared_dir / "none"):
        capsys.readouterr()
        assert ghost_cmd(ro) == 2
        err = _error(capsys)
        assert (
            f"--out {ro} cannot be written: no file can be created in {ro} (Permission denied)"
            in err
        )
        assert ghost_cmd(ro / "sub") == 2
        assert f"--out {ro / 'sub'} cannot be created" in _error(capsys)
    assert list(ro.iterdir()) == []


def test_read_only_jobs_folder_is_refused_before_computing(shared_dir, capsys, monkeypatch):
    out = shared_dir / "run"
    assert ghost_cmd(out, "--max-jobs", "1") == 0
    (out / "jobs").chmod(0o555)
    run_job = ghost.run_job
    monkeypatch.setattr(ghost, "run_job", lambda *a: pytest.fail("computed for nothing"))
    with unprivileged(out):
        capsys.readouterr()
        assert ghost_cmd(out, "--resume") == 2
        assert f"no file can be created in {out / 'jobs'}" in _error(capsys)
    (out / "jobs").chmod(0o755)
    monkeypatch.setattr(ghost, "run_job", run_job)
    assert ghost_cmd(out, "--resume") == 0


def test_a_record_that_cannot_be_written_stops_the_run(tmp_path, capsys, monkeypatch):
    """E.g. a full disk: a clear error, never a computed job dropped silently."""
    write = runner.atomic_write

    def full_disk(path, data):
        if Path(path).parent.name == "jobs":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(runner, "atomic_write", full_disk)
    out = tmp_path / "run"
    assert ghost_cmd(out) == 2
    err = _error(capsys)
    assert f"the record of job plain-relu.0000 could not be written to {out / 'jobs'}" in err
    assert "No space left on device" in err and "is lost" in err and "--resume" in err


# ----------------------------------------------------------------------------- checkpoints
class _Code:
    def __reduce__(self):
        return (os.getpid, ())  # harmless here, but a checkpoint that refers to code is refused


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "not a zip file":
        path.write_text("hello, not a checkpoint")
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a pickle with a forbidden global
        torch.save({"model": _Code()}, path)


DAMAGE = ["truncated", "not a zip file", "empty", "forbidden global"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_a_clear_error(how, tmp_path):
    path = tmp_path / "job.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    assert load_checkpoint(path)["epoch"] == 1
    _damage(path, how)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "Delete it to restart that job" in msg and "--resume" in msg
    assert "weights_only" not in msg and "\n" not in msg
    assert (
        e.value.__suppress_context__
    )  # torch's message (suggesting weights_only=False) is not shown
    if how == "forbidden global":
        assert "a reference to code" in msg and "getpid" in msg


def test_a_checkpoint_of_something_else_is_a_clear_error(tmp_path):
    path = tmp_path / "job.pt"
    model = torch.nn.Linear(2, 2)
    save_training_state(path, {"model": model})
    with pytest.raises(
        CheckpointError, match="does not hold this job's training state .no 'optimizer'"
    ):
        restore_training_state(
            path, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), 0.1)}
        )
    with pytest.raises(CheckpointError, match="does not hold this job's training state"):
        restore_training_state(path, {"model": torch.nn.Linear(3, 2)})


def test_an_epoch_loop_refuses_a_checkpoint_without_its_values(tmp_path):
    path = tmp_path / "job.pt"
    model = torch.nn.Linear(2, 2)
    loop = EpochLoop(path, {"model": model}, 3, {"history": []}, desc="job")
    loop.run(lambda e: (e == 2, f"epoch {e}"))  # diverges at epoch 2: stops there
    assert (loop.epoch, loop.diverged) == (2, True) and load_checkpoint(path)["epoch"] == 2
    again = EpochLoop(path, {"model": model}, 3, {"history": [1]}, desc="job")
    assert (again.epoch, again.diverged, again.values) == (2, True, {"history": []})
    with pytest.raises(CheckpointError, match="does not hold this job's training state .no 'lrs'"):
        EpochLoop(path, {"model": model}, 3, {"history": [], "lrs": []}, desc="job")
    with pytest.raises(ValueError, match=r"\['rng'\] would overwrite"):
        EpochLoop(None, {"model": model}, 3, {"rng": []}, desc="job")


@pytest.mark.parametrize("how", ["truncated", "forbidden global"])
def test_cifar_resume_with_a_damaged_checkpoint(how, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GSCFAST_BACKEND", "torch")
    monkeypatch.setattr(cifar, "_INTERRUPT_AFTER", 1)  # a kill right after the first checkpoint
    args = [
        "cifar",
        "--out",
        str(tmp_path / "run"),
        "--dataset",
        "digits",
        "--archs",
        "SeLU",
        "--lrs",
        "0.1",
        "--search-epochs",
        "2",
        "--epochs",
        "1",
        "--depth",
        "2",
        "--width",
        "8",
        "--batch-size",
        "500",
        "--ed-samples",
        "0",
        "--ed-every",
        "0",
        "--backend",
        "torch",
        "--threads",
        "1",
        "--quiet",
    ]
    assert main(args) == 130
    ckpt = tmp_path / "run" / "search" / "checkpoints" / "SeLU.lr0.1.pt"
    _damage(ckpt, how)
    capsys.readouterr()
    monkeypatch.setattr(cifar, "_INTERRUPT_AFTER", None)
    assert main([*args, "--resume"]) == 2
    err = _error(capsys)
    assert (
        f"gscfast cifar: error: checkpoint {ckpt} cannot be used" in err
        and "weights_only" not in err
    )
    ckpt.unlink()  # as the message says
    assert main([*args, "--resume"]) == 0
