"""The Gaussian-noise study at quick scale: every output file, the numbers against the API, resume
bit for bit, refusal of foreign or corrupted results directories, the command line, and Ray."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _study_results import numbers as _numbers

import gscfast
from gscfast.__main__ import main
from gscfast.experiments import gaussian, outputs
from gscfast.experiments.runner import job_seed, thread_limit

ARCHS = ["batch-tanh", "ReLU"]
DEPTH, WIDTH, DATASETS, SAMPLES = 5, 16, 3, 64
BASE = [
    "--datasets",
    str(DATASETS),
    "--samples",
    str(SAMPLES),
    "--depth",
    str(DEPTH),
    "--width",
    str(WIDTH),
    "--backend",
    "torch",
    "--threads",
    "1",
    "--quiet",
]
ARGS = [*BASE, "--archs", *ARCHS]
OUTPUTS = ["figure1.png", "figure1.pdf", "results.json", "layers.csv", "summary.md"]


def study(out: Path, *extra: str, args: list[str] = ARGS) -> int:
    return main(["gaussian", "--out", str(out), *args, *extra])


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gaussian") / "run"
    assert study(out) == 0
    return out


def test_every_output_file(full):
    assert sorted(p.name for p in full.iterdir()) == sorted(OUTPUTS + ["manifest.json", "jobs"])
    assert len(list((full / "jobs").iterdir())) == len(ARCHS) * DATASETS
    assert (full / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (full / "figure1.pdf").read_bytes()[:5] == b"%PDF-"

    res = json.loads((full / "results.json").read_text())  # strict JSON: NaN written as null
    assert res["config"]["archs"] == ARCHS and res["gscfast_version"] == gscfast.__version__
    assert set(res["seconds"]) == {p.stem for p in (full / "jobs").iterdir()}
    for arch in ARCHS:
        a = res["archs"][arch]
        assert len(a["datasets"]) == DATASETS
        assert [d["dataset"] for d in a["datasets"]] == list(range(DATASETS))
        for q in ("gsc", "preact_std", "sign_diversity"):
            assert set(a["layers"][q]) == {"mean", "median", "q10", "q90"}
            assert all(len(v) == DEPTH + 1 for v in a["layers"][q].values())
        assert a["layers"]["gsc"]["mean"][0] == 1.0 and a["layers"]["preact_std"]["mean"][0] is None
        # The headline is the pooled expected GSC over all datasets' datapoints, and the rate
        # fitted to it, each with a bootstrap interval.
        p = a["pooled"]
        pooled = gscfast.pool([gscfast.GSCMoments.from_dict(d["moments"]) for d in a["datasets"]])
        assert p["gsc"] == pooled.gsc().tolist() and p["gsc"][0] == 1.0
        assert p["datasets"] == DATASETS and p["datapoints"] == pooled.count
        assert all(lo <= g <= hi for lo, g, hi in zip(p["gsc_lo"], p["gsc"], p["gsc_hi"]))
        r = a["rate"]
        assert r["pooled"] == pytest.approx(
            gscfast.explosion_rate(torch.tensor(p["gsc"], dtype=torch.float64)), rel=1e-12
        )
        assert r["ci95"][0] <= r["pooled"] <= r["ci95"][1]
        assert a["gsc_L"]["pooled"] == p["gsc"][DEPTH]
        rd = a["rate_per_dataset"]
        assert rd["n"] == DATASETS and rd["ci95"][0] < rd["mean"] < rd["ci95"][1]
        assert rd["mean"] == pytest.approx(
            sum(d["rate"] for d in a["datasets"]) / DATASETS, rel=1e-12
        )
    assert res["archs"]["batch-tanh"]["predicted_rate"] == 1.178
    assert res["archs"]["ReLU"]["predicted_rate"] is None

    rows = (full / "layers.csv").read_text().splitlines()
    assert rows[0] == "arch,dataset,l,gsc,preact_std,sign_diversity"
    assert len(rows) == 1 + len(ARCHS) * (DATASETS + 7) * (DEPTH + 1)
    assert "ReLU,mean,0,1.0,," in rows and "ReLU,pooled,0,1.0,," in rows
    pooled = res["archs"]["ReLU"]["pooled"]
    for name, key in (("pooled", "gsc"), ("pooled_lo", "gsc_lo"), ("pooled_hi", "gsc_hi")):
        assert [float(r.split(",")[3]) for r in rows if r.startswith(f"ReLU,{name},")] == pooled[
            key
        ]

    summary = (full / "summary.md").read_text()
    assert f"gscfast {gscfast.__version__}" in summary
    for text in (
        "| batch-tanh |",
        "| ReLU |",
        "1.178",
        "95% CI",
        "pooled expected GSC",
        "percentile bootstrap",
        "a mean of ratios is not an expected GSC",
        "FLOP floor",
        "seconds per job",
        '"samples": 64',
    ):
        assert text in summary, text


def test_numbers_are_those_of_the_api(full):
    """A job is gscfast.analyze on the documented data and network, seeded as documented."""
    rec = json.loads((full / "jobs" / "batch-tanh.00001.json").read_text())
    assert rec["spec"]["data_seed"] == job_seed(0, "data", 1)
    assert rec["spec"]["net_seed"] == job_seed(0, "net", "batch-tanh", 1)
    x, y = gaussian.make_dataset(rec["spec"]["data_seed"], SAMPLES, WIDTH)
    assert torch.allclose(x.norm(dim=1), torch.full((SAMPLES,), 10.0))
    model = gscfast.mlp(DEPTH, WIDTH, act="tanh", norm="batch", seed=rec["spec"]["net_seed"])
    with thread_limit(1):  # as the job ran
        a = gscfast.analyze(model, x, y, backend="torch")
    assert rec["result"]["gsc"] == a.gsc.tolist() and rec["result"]["rate"] == a.rate
    assert rec["result"]["moments"] == a.moments.to_dict()


def test_seeds_are_stable():
    assert job_seed(0, "net", "ReLU", 0) == 6997162981005458297
    assert job_seed(0, "data", 0) == 7493556065592169722


def test_datasets_are_drawn_once_and_handed_out_as_copies():
    """The jobs run dataset-major and the last draw is kept: every architecture of a dataset
    gets the same data, and a caller that changes its tensors changes no later job's data."""
    study = gaussian.make_study(gaussian.make_config(datasets=2, samples=50, depth=3, width=8))
    datasets = [job.spec["dataset"] for job in study.jobs]
    assert datasets == sorted(datasets)  # dataset-major
    x, y = gaussian.make_dataset(7, 50, 8)
    fresh = torch.Generator().manual_seed(7)
    x0 = torch.randn(50, 8, generator=fresh, dtype=torch.float64) / 10
    assert torch.equal(x, (x0 * (10 / x0.norm(dim=1, keepdim=True))).float())
    x.mul_(0.0), y.add_(1.0)
    x2, y2 = gaussian.make_dataset(7, 50, 8)
    assert torch.equal(x2, (x0 * (10 / x0.norm(dim=1, keepdim=True))).float())
    assert not torch.equal(y2, y)
    x64, _ = gaussian.make_dataset(7, 50, 8, dtype=torch.float64)
    x64.zero_()
    assert torch.equal(gaussian.make_dataset(7, 50, 8)[0], x2)


def test_kernels_are_compiled_ahead_in_the_order_the_jobs_use_them(tmp_path, monkeypatch):
    """Before its first job the local engine asks ``numba_backend.compile_ahead`` for the sweep
    kernels of the jobs still to run, in their order (the compiler says which architectures
    couple the batch); not where the jobs run on another backend, nor when nothing is left."""
    from gscfast.backends import numba_backend

    asked: list[tuple] = []
    monkeypatch.setattr(numba_backend, "compile_ahead", lambda k, dt: asked.append((k, dt)))
    args = [*BASE, "--archs", "ReLU", "batch-tanh", "tanh"]
    numba = [a if a != "torch" else "numba" for a in args]
    assert study(tmp_path / "torch", args=args) == 0
    assert asked == []
    assert study(tmp_path / "numba", "--max-jobs", "2", args=numba) == 0
    assert asked == [(["sweep_kernel", "coupled_sweep_kernel"], torch.float32)]  # 2 jobs
    assert study(tmp_path / "numba", "--resume", args=numba) == 0  # from tanh.00000 on
    assert asked[1] == (["sweep_kernel", "coupled_sweep_kernel"], torch.float32)
    asked.clear()
    assert study(tmp_path / "numba", "--resume", args=numba) == 0  # complete: no job to run
    assert asked == []
    pairs = [*numba, "--datasets", "1", "--pairs", "--pairs-samples", "4"]
    assert study(tmp_path / "pairs", "--max-jobs", "4", args=pairs) == 0  # 3 + ReLU.pairs
    assert study(tmp_path / "pairs", "--resume", args=pairs) == 0  # batch-tanh, tanh pairs
    # the per-sample networks' GSC(k, l) runs on chain_kernel; batch-tanh's on the torch engine
    three = ["sweep_kernel", "coupled_sweep_kernel", "chain_kernel"]
    assert asked == [(three, torch.float32), (["chain_kernel"], torch.float32)]


@pytest.mark.parametrize("cached", [False, True])
def test_a_cold_kernel_cache_is_announced(tmp_path, monkeypatch, capsys, cached):
    """Where a kernel the jobs need is not cached, a line above the progress bar says that numba
    compiles it first (the first job would otherwise seem to hang); not with --quiet."""
    from gscfast.backends import numba_backend

    monkeypatch.setattr(numba_backend, "compile_ahead", lambda k, dt: k[1:2])
    monkeypatch.setattr(numba_backend, "is_cached", lambda k, dt: cached)
    args = [a if a != "torch" else "numba" for a in BASE if a != "--quiet"]
    assert study(tmp_path / "run", "--datasets", "1", args=[*args, "--archs", *ARCHS]) == 0
    err = capsys.readouterr().err
    note = "numba compiles coupled_sweep_kernel, sweep_kernel for this machine first"
    assert (note in err and "side by side" in err) == (not cached)
    assert (
        study(tmp_path / "quiet", "--datasets", "1", "--quiet", args=[*args, "--archs", *ARCHS])
        == 0
    )
    assert "numba compiles" not in capsys.readouterr().err


def test_resume_after_max_jobs_is_bit_for_bit(full, tmp_path):
    out = tmp_path / "run"
    assert study(out, "--max-jobs", "2") == 0
    assert len(list((out / "jobs").iterdir())) == 2 and not (out / "results.json").exists()
    assert study(out, "--max-jobs", "1", "--resume") == 0
    assert len(list((out / "jobs").iterdir())) == 3
    assert study(out, "--resume") == 0
    assert _numbers(out, "layers.csv") == _numbers(full, "layers.csv")


def test_resume_after_interrupt_is_bit_for_bit(full, tmp_path, monkeypatch):
    out, calls = tmp_path / "run", []
    run_job = gaussian.run_job

    def flaky(config, spec):
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the fifth job
        calls.append(spec)
        return run_job(config, spec)

    monkeypatch.setattr(gaussian, "run_job", flaky)
    assert study(out) == 130
    assert len(list((out / "jobs").iterdir())) == 4  # the four finished jobs, nothing half-written
    monkeypatch.setattr(gaussian, "run_job", run_job)
    assert study(out, "--resume") == 0
    assert _numbers(out, "layers.csv") == _numbers(full, "layers.csv")


def test_resume_of_a_complete_run_only_regenerates(full, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(full, out)
    for name in OUTPUTS:
        (out / name).unlink()
    monkeypatch.setattr(
        gaussian, "run_job", lambda *a: pytest.fail("a finished job was recomputed")
    )
    assert study(out, "--resume") == 0
    assert _numbers(out, "layers.csv") == _numbers(full, "layers.csv")
    assert all((out / name).stat().st_size > 0 for name in OUTPUTS)


def test_job_order_does_not_change_numbers(full, tmp_path):
    out = tmp_path / "run"
    assert study(out, args=[*BASE, "--archs", *ARCHS[::-1]]) == 0
    assert _numbers(out, "layers.csv")["jobs"] == _numbers(full, "layers.csv")["jobs"]


def _corrupt_job(d: Path) -> None:
    p = d / "jobs" / "ReLU.00001.json"
    p.write_text(p.read_text()[:40])


def _other_run_job(d: Path) -> None:
    """A well-formed record from a run with another seed."""
    other = d.parent / "other"
    assert study(other, "--seed", "1", "--max-jobs", "1") == 0
    shutil.copy(other / "jobs" / "batch-tanh.00000.json", d / "jobs" / "batch-tanh.00000.json")
    shutil.rmtree(other)


def _edit_manifest(**changes):
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        m.update(changes)
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


def _edit_job(**changes):
    def edit(d: Path) -> None:
        p = d / "jobs" / "ReLU.00001.json"
        rec = json.loads(p.read_text())
        rec["result"].update(changes)
        for k, v in changes.items():
            if v is None:
                del rec["result"][k]
        p.write_text(json.dumps(rec))

    return edit


REFUSALS = {  # name -> (how to spoil a finished run, extra options, words of the message)
    "non-empty without --resume": (lambda d: None, [], "not empty"),
    "foreign directory": (
        lambda d: (d / "manifest.json").unlink(),
        ["--resume"],
        "no manifest.json",
    ),
    "corrupted manifest": (
        lambda d: (d / "manifest.json").write_text('{"format": '),
        ["--resume"],
        "manifest.json is corrupted",
    ),
    "other options": (lambda d: None, ["--resume", "--datasets", "4"], "datasets 3 there, 4 here"),
    "other gscfast version": (
        _edit_manifest(gscfast_version="0.0.1"),
        ["--resume"],
        "gscfast_version '0.0.1' there",
    ),
    "corrupted job file": (_corrupt_job, ["--resume"], "ReLU.00001.json is corrupted"),
    "job of another run": (_other_run_job, ["--resume"], "another run"),
    "foreign job file": (
        lambda d: (d / "jobs" / "SeLU.00000.json").write_text("{}"),
        ["--resume"],
        "not a job of this run",
    ),
    "record of an older gscfast": (
        _edit_job(moments=None),
        ["--resume"],
        "has no 'moments', the raw per-dataset expectations",
    ),
    "true in place of a number": (_edit_job(rate=True), ["--resume"], "'rate' is not a number"),
    "true in a list": (
        _edit_job(gsc=[True] * (DEPTH + 1)),
        ["--resume"],
        "'gsc'[0] is not a number",
    ),
    "bad moments": (
        _edit_job(moments={"sq_grad": [1.0], "sq_out": [1.0], "n": [1.0], "count": True}),
        ["--resume"],
        "count must be a positive int",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_foreign_or_corrupted_directories(case, full, tmp_path, capsys):
    spoil, extra, message = REFUSALS[case]
    out = tmp_path / "run"
    shutil.copytree(full, out)
    spoil(out)
    before = snapshot(out)
    capsys.readouterr()
    assert study(out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and str(out) in err, err
    assert snapshot(out) == before  # nothing written, nothing mixed


def test_refuses_a_file_in_place_of_the_directory(tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    assert study(tmp_path / "run") == 2
    assert "not a directory" in capsys.readouterr().err


def test_command_line_entry_point(tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--archs", "SeLU"]
    proc = subprocess.run(
        [sys.executable, "-m", "gscfast", "gaussian", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and proc.stderr == ""  # --quiet: no progress bar
    assert all((out / name).is_file() for name in OUTPUTS)
    bad = subprocess.run(
        [sys.executable, "-m", "gscfast", "gaussian", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "not empty" in bad.stderr


def test_bad_architecture_is_a_clear_error(tmp_path, capsys):
    assert study(tmp_path / "run", args=["--archs", "batch-relu", "--quiet"]) == 2
    assert "unknown architecture 'batch-relu'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_architecture_names():
    assert gaussian.parse_arch("layer-tanh") == {
        "act": "tanh",
        "norm": "layer",
        "init": "gaussian",
        "residual": None,
    }
    assert gaussian.parse_arch("orth-res-sqrt-batch-ReLU") == {
        "act": "relu",
        "norm": "batch",
        "init": "orthogonal",
        "residual": "sqrt",
    }
    assert gaussian.parse_arch("res-SeLU")["residual"] == 1.0
    assert gaussian.expand_archs(["paper"]) == gaussian.PAPER_ARCHS
    assert len(gaussian.expand_archs(["all", "ReLU"])) == 28
    assert gaussian.predicted_rate("batch-ReLU") == 1.467
    assert gaussian.predicted_rate("res-batch-ReLU") is None


def test_t_interval():
    mean, low, high, sd = outputs.t_interval([1.0, 2.0, 3.0, float("nan")])
    half = 4.302652729749462 / math.sqrt(3)
    assert (
        (mean, sd) == (2.0, 1.0)
        and low == pytest.approx(2 - half)
        and high == pytest.approx(2 + half)
    )
    assert math.isnan(outputs.t_interval([1.0])[1])


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert study(tmp_path / "run", "--engine", "ray") == 2
    assert "needs Ray" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_ray_engine_gives_the_local_numbers(full, tmp_path):
    pytest.importorskip("ray", reason="Ray is optional (pip install 'gscfast[ray]')")
    out = tmp_path / "run"
    assert study(out, "--engine", "ray", "--num-cpus", "2") == 0
    assert _numbers(out, "layers.csv") == _numbers(full, "layers.csv")
    assert {json.loads(p.read_text())["engine"] for p in (out / "jobs").iterdir()} == {"ray"}


def test_progress_bar_and_quiet(tmp_path, capsys):
    assert study(tmp_path / "a", args=[*BASE, "--archs", "ReLU"]) == 0
    assert capsys.readouterr().err == ""  # BASE has --quiet
    assert (
        study(tmp_path / "b", args=[a for a in BASE if a != "--quiet"] + ["--archs", "ReLU"]) == 0
    )
    err = capsys.readouterr().err
    assert "gaussian: 100%" in err and f"{DATASETS}/{DATASETS}" in err and "<00:00" in err  # ETA


def test_a_directory_in_use_is_refused(full, tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    shutil.copytree(full, out)
    (out / "jobs" / "ReLU.00002.json").unlink()
    (out / "jobs" / ".ReLU.00002.json.tmp-123").write_text("half a rec")  # an interrupted write
    with open(out / ".lock", "w") as f:
        f.write("4242")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        assert study(out, "--resume") == 2
    assert "in use by another gscfast process (pid 4242)" in capsys.readouterr().err
    assert study(out, "--resume") == 0  # the temp file is dropped, the job recomputed
    assert (
        _numbers(out, "layers.csv") == _numbers(full, "layers.csv") and not (out / ".lock").exists()
    )


def test_pairs_heatmaps_and_deviation(full, tmp_path):
    """--pairs: GSC(k, l) of dataset 0's network on a subset, exact without batch statistics and
    sketched with them, with the largest deviation from GSC(k, 0) / GSC(l, 0) in the summary."""
    out = tmp_path / "run"
    assert study(out, "--pairs", "--pairs-samples", "20") == 0
    for name in ("pairs.png", "pairs.pdf", "pairs.csv"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["pairs"] is True and cfg["pairs_samples"] == 20
    spec = json.loads((out / "jobs" / "ReLU.pairs.json").read_text())["spec"]
    x, y = gaussian.make_dataset(spec["data_seed"], SAMPLES, WIDTH)
    model = gaussian.make_model("ReLU", DEPTH, WIDTH, spec["net_seed"])
    want = gscfast.gsc_matrix(model, x[:20], y[:20], backend="torch").double()
    p = res["pairs"]["ReLU"]
    assert p["method"] == "exact" and res["pairs"]["batch-tanh"]["method"] == "sketch"
    got = torch.tensor(
        [row + [math.nan] * (DEPTH - k) for k, row in enumerate(p["matrix"])], dtype=torch.float64
    )
    assert torch.allclose(got, want, rtol=1e-5, equal_nan=True)
    factors = [
        max(r, 1 / r)
        for k in range(2, DEPTH + 1)
        for l in range(1, k)
        for r in [float(want[k, l] * want[l, 0] / want[k, 0])]
    ]
    assert p["max_factor"] == pytest.approx(max(factors), rel=1e-4)
    rows = (out / "pairs.csv").read_text().splitlines()
    assert rows[0] == "arch,k,l,gsc" and len(rows) == 1 + 2 * (DEPTH + 1) * (DEPTH + 2) // 2
    summary = (out / "summary.md").read_text()
    assert "largest deviation of GSC(k, l)" in summary and "| batch-tanh | sketch |" in summary
    # the per-dataset jobs are those of the run without --pairs
    full_jobs = {k: v for k, v in _numbers(full, "layers.csv")["jobs"].items()}
    jobs = _numbers(out, "layers.csv")["jobs"]
    assert {k: v for k, v in jobs.items() if ".pairs" not in k} == full_jobs


def test_pairs_samples_is_checked(tmp_path, capsys):
    assert study(tmp_path / "run", "--pairs", "--pairs-samples", str(SAMPLES + 1)) == 2
    assert "pairs-samples must be an integer in [2, samples = 64]" in capsys.readouterr().err


def test_pairs_summary_of_an_undefined_ratio_is_infinite_not_a_crash():
    """A GSC(k, 0) of 0 (a dead network) makes GSC(k, l) GSC(l, 0) / GSC(k, 0) undefined: that
    pair is the worst deviation (inf), and the summary is still written."""
    m = [[1.0], [2.0, 1.0], [4.0, 2.0, 1.0], [0.0, 1.0, 1.0, 1.0]]
    p = gaussian.pairs_summary({"matrix": m, "method": "exact", "probes": None})
    assert p["max_factor"] == math.inf and p["max_at"] == [3, 1]
    exact = gaussian.pairs_summary({"matrix": m[:3], "method": "exact", "probes": None})
    assert exact["max_factor"] == 1.0 and exact["median_factor"] == 1.0
