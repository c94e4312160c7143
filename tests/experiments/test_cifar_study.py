"""The CIFAR study end to end at tiny scale on a generated archive in the official format: every
output file, the search skipping a diverged job, checkpoint and resume bit for bit, the Taylor curve
at K = 0, the effective depth of an untrained model, and ``--dataset digits``."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
from pathlib import Path

import pytest
import torch

import gscfast
from gscfast.__main__ import main
from gscfast.data.cifar import write_fake_archive
from gscfast.experiments import cifar

ARCHS = ["SeLU", "batch-tanh"]
LRS = ["1e5", "0.01"]  # 1e5 diverges for SeLU (no normalization)
DEPTH, WIDTH, EPOCHS, SEARCH_EPOCHS = 3, 16, 3, 2
COMMON = [
    "--depth",
    str(DEPTH),
    "--width",
    str(WIDTH),
    "--batch-size",
    "50",
    "--ed-samples",
    "100",
    "--ed-every",
    "2",
    "--backend",
    "torch",
    "--threads",
    "1",
    "--quiet",
]


@pytest.fixture(scope="module", autouse=True)
def torch_backend():
    """Every measurement on the torch backend (no JIT compilation in tests)."""
    old = os.environ.get("GSCFAST_BACKEND")
    os.environ["GSCFAST_BACKEND"] = "torch"
    yield
    if old is None:
        os.environ.pop("GSCFAST_BACKEND", None)
    else:
        os.environ["GSCFAST_BACKEND"] = old


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("cifar-data")
    md5 = write_fake_archive(root, "cifar10", "python", n_train=250, n_test=10)
    return [
        "--dataset",
        "cifar10",
        "--data-dir",
        str(root),
        "--data-md5",
        md5,
        "--archs",
        *ARCHS,
        "--lrs",
        *LRS,
        "--epochs",
        str(EPOCHS),
        "--search-epochs",
        str(SEARCH_EPOCHS),
        *COMMON,
    ]


@pytest.fixture(scope="module")
def full(tmp_path_factory, archive) -> Path:
    out = tmp_path_factory.mktemp("cifar") / "run"
    assert main(["cifar", "--out", str(out), *archive]) == 0
    return out


def _strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def _csv_without(text: str, prefix: tuple[str, ...]) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    keep = [i for i, c in enumerate(rows[0]) if not c.startswith(prefix)]
    return [[r[i] for i in keep] for r in rows]


def numbers(d: Path) -> dict:
    """Everything but wall-clock times."""
    res = _strip_seconds(json.loads((d / "results.json").read_text()))
    jobs = {
        f"{ph}/{p.name}": _strip_seconds(json.loads(p.read_text())["result"])
        for ph in ("search", "final")
        for p in sorted((d / ph / "jobs").iterdir())
    }
    return {
        "results": res,
        "jobs": jobs,
        "epochs": _csv_without((d / "epochs.csv").read_text(), ("t_",)),
        "search": _csv_without((d / "search.csv").read_text(), ("seconds",)),
        "layers": (d / "layers.csv").read_text(),
        "taylor": (d / "taylor.csv").read_text(),
    }


def test_every_output_file(full):
    assert sorted(p.name for p in full.iterdir()) == sorted([*cifar.OUTPUTS, "search", "final"])
    assert (full / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (full / "figure3.pdf").read_bytes()[:5] == b"%PDF-"
    res = json.loads((full / "results.json").read_text())  # strict JSON
    assert res["config"]["archs"] == ARCHS and res["gscfast_version"] == gscfast.__version__
    L = DEPTH + 1
    for arch in ARCHS:
        a = res["archs"][arch]
        assert len(a["search"]) == len(LRS)
        hist = a["history"]
        assert [h["epoch"] for h in hist] == list(range(EPOCHS + 1))
        for h in hist:
            assert len(h["gsc"]) == len(h["opnorm"]) == len(h["preact_std"]) == L + 1
            assert h["gsc"][0] == 1.0 and len(h["profile_subset"]) == L + 1
            assert {"error", "gsc", "opnorm", "ed_subset"} <= set(h["seconds"])
        assert [h["epoch"] for h in hist if "ed_full" in h] == [0, 2, 3]  # every 2 and the last
        assert all(h["seconds"]["train"] > 0 for h in hist[1:])
        assert len(a["taylor"]["error_rate"]) == L + 1
        prof = hist[-1]["profile_subset_matrix"]  # the whole profile at the end, [l, lambda]
        assert len(prof) == L + 1 and prof[0][0] == 1.0 and prof[L][L] is None
        assert prof[L][:L] == hist[-1]["profile_subset"][:L]
    rows = (full / "epochs.csv").read_text().splitlines()
    assert rows[0].startswith("arch,epoch,lr,train_loss,train_error,gsc_L0,ed_subset,ed_full")
    assert len(rows) == 1 + len(ARCHS) * (EPOCHS + 1)
    assert len((full / "layers.csv").read_text().splitlines()) == 1 + len(ARCHS) * (EPOCHS + 1) * (
        L + 1
    )
    assert len((full / "taylor.csv").read_text().splitlines()) == 1 + len(ARCHS) * (L + 1)
    summary = (full / "summary.md").read_text()
    assert "Effective depth: subset against full set" in summary and "Timings per epoch" in summary
    for phase in ("search", "final"):
        assert (full / phase / "manifest.json").is_file()
    assert len(list((full / "search" / "jobs").iterdir())) == len(ARCHS) * len(LRS)
    assert sorted(p.name for p in (full / "final" / "checkpoints").iterdir()) == [
        f"{a}.pt" for a in sorted(ARCHS)
    ]


def test_search_skips_diverged_job(full):
    res = json.loads((full / "results.json").read_text())
    selu = {s["lr"]: s for s in res["archs"]["SeLU"]["search"]}
    assert selu[1e5]["diverged"] is True and selu[1e5]["final_error"] is None
    assert selu[0.01]["diverged"] is False
    assert res["chosen_lrs"]["SeLU"] == 0.01 and res["archs"]["SeLU"]["diverged"] is False
    rows = list(csv.DictReader(io.StringIO((full / "search.csv").read_text())))
    assert {(r["arch"], r["lr"], r["diverged"]) for r in rows} >= {("SeLU", "100000.0", "1")}


def test_diverging_job_returns_instead_of_raising(tmp_path):
    config = cifar.make_config(
        dataset="digits", depth=2, width=8, epochs=3, ed_samples=0, ed_every=0
    )
    spec = {
        "arch": "SeLU",
        "lr": 1e5,
        "epochs": 3,
        "measure": True,
        "checkpoint": str(tmp_path / "c.pt"),
    }
    r = cifar.train_job(config, spec)
    assert r["diverged"] is True and r["final_error"] is None and r["epochs_done"] < 3
    assert cifar.load_checkpoint(tmp_path / "c.pt")["epoch"] == r["epochs_done"]


def test_taylor_curve_at_zero_is_the_models_error(full):
    res = json.loads((full / "results.json").read_text())
    assert res["config"]["bn_datapoint"] == "frozen"
    for arch in ARCHS:
        # The default frozen form expands the function every other measurement sees (batch norm
        # frozen at the whole set's statistics): K = 0 is the training error, batch norm or not.
        a = res["archs"][arch]
        assert a["taylor"]["error_rate"][0] == a["final_error"]
        assert a["taylor"]["loss"][0] == pytest.approx(a["final_loss"], rel=1e-5)
    selu = res["archs"]["SeLU"]  # no batch norm: eval mode is the training-set error itself
    assert selu["taylor"]["error_rate"][0] == selu["eval_error"]
    bt = res["archs"]["batch-tanh"]  # running statistics differ from the whole set's
    assert bt["eval_loss"] != pytest.approx(bt["final_loss"], rel=1e-5)


def test_untrained_effective_depth_is_zero(full):
    res = json.loads((full / "results.json").read_text())
    for arch in ARCHS:
        h0 = res["archs"][arch]["history"][0]
        assert h0["epoch"] == 0 and h0["ed_subset"] == 0 and h0["ed_full"] == 0
        assert all(v == 0.0 for v in h0["opnorm"][1:])
    config = cifar.make_config(dataset="digits", depth=DEPTH, width=WIDTH)
    model = cifar.make_model("batch-tanh", config, 64)
    x, y = cifar.load_data(config)
    d, _ = gscfast.effective_depth(model, copy.deepcopy(model), x[:64], y[:64], error="kl")
    assert d == 0


def test_checkpoint_is_safe_and_complete(full):
    c = cifar.load_checkpoint(full / "final" / "checkpoints" / "SeLU.pt")  # weights_only=True
    assert c["epoch"] == EPOCHS
    assert {"model", "init", "optimizer", "schedule", "rng", "history", "state"} <= set(c)
    model = cifar.make_model(
        "SeLU", json.loads((full / "final" / "manifest.json").read_text())["config"], 3072
    )
    model.load_state_dict(c["model"])
    assert len(json.loads(c["history"])) == EPOCHS + 1


def test_resume_after_interruptions_gives_the_same_numbers(full, archive, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(cifar, "_INTERRUPT_AFTER", 1)  # a kill after every epoch's checkpoint
    calls, status = 0, 130
    while status == 130:
        status = main(["cifar", "--out", str(out), *archive, *(["--resume"] if calls else [])])
        calls += 1
        assert calls < 40
    assert status == 0 and calls > len(ARCHS) * EPOCHS
    assert numbers(out) == numbers(full)


def test_plateau_schedule_and_refusals(tmp_path, archive):
    s = cifar.PlateauSchedule(1.0, patience=2, factor=1 / 3)
    lrs = [s.step(e) for e in (0.5, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3)]
    assert lrs == pytest.approx([1, 1, 1, 1 / 3, 1 / 3, 1 / 3, 1 / 9])
    t = cifar.PlateauSchedule(2.0)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    (tmp_path / "x").write_text("other")
    assert main(["cifar", "--out", str(tmp_path), *archive]) == 2  # non-empty, no --resume
    assert main(["cifar", "--out", str(tmp_path / "n"), *archive, "--archs", "ReLU"]) == 2


def test_digits_end_to_end_and_untrained(tmp_path):
    out = tmp_path / "digits"
    assert (
        main(
            [
                "cifar",
                "--out",
                str(out),
                "--dataset",
                "digits",
                "--archs",
                "layer-tanh",
                "--lrs",
                "0.1",
                "--search-epochs",
                "1",
                "--epochs",
                "0",
                *COMMON,
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    a = res["archs"]["layer-tanh"]
    assert [h["epoch"] for h in a["history"]] == [0]
    assert a["history"][0]["ed_subset"] == 0 and a["history"][0]["ed_full"] == 0
    assert a["taylor"]["error_rate"][0] == a["final_error"]
    assert all((out / f).is_file() for f in cifar.OUTPUTS)


BN_ARCHS = [a for a, (_, norm) in cifar.ARCHS.items() if norm == "batch"]


@pytest.mark.parametrize("arch", BN_ARCHS)
def test_batchnorm_measurements_do_not_depend_on_how_many_images_are_measured(arch):
    """Issue 11: on digits (depth 10, the study's width), a batch-norm architecture's GSC(L, 0) at
    initialization changes by less than 1.5x between 500 and all 1,797 images in the default
    (frozen) form; so do c(L, 0) of the effective depth and the pre-activation std. The coupled form
    (the measured set one datapoint) scales like 1/B: 1,797 / 500 = 3.6x, more than 2x."""
    from gscfast.data import digits

    # All 1,797 images (the study trains on its 1,438-image split; the test split is standardized
    # the same way).
    x, y = (torch.cat(t) for t in zip(digits(train=True), digits(train=False)))
    assert len(x) == 1797
    sub = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:500]
    ratios = {}
    for bn in (None, "batch"):  # None: the study's default
        kw = {} if bn is None else {"bn_datapoint": bn}
        config = cifar.make_config(
            dataset="digits", depth=10, ed_samples=0, ed_every=1, backend="torch", **kw
        )
        model = cifar.make_model(arch, config, x.shape[1])
        init = copy.deepcopy(model)
        every = cifar._measure(config, model, init, x, y, None, 0, 0)
        part = cifar._measure(config, model, init, x[sub], y[sub], None, 0, 0)
        L = config["depth"] + 1
        ratios[bn] = {
            k: every[k][i] / part[k][i]
            for k, i in (("gsc", L), ("profile_full", 0), ("preact_std", L))
        }
    for k, r in ratios[None].items():
        assert 1 / 1.5 < r < 1.5, (k, ratios)
    assert ratios["batch"]["gsc"] < 1 / 2, ratios


def test_bn_datapoint_reaches_every_measurement_and_the_summary(tmp_path, capsys):
    common = [
        "--dataset",
        "digits",
        "--archs",
        "batch-ReLU",
        "SeLU",
        "--lrs",
        "0.1",
        "--search-epochs",
        "1",
        "--epochs",
        "0",
        *COMMON,
    ]
    res, summary = {}, {}
    for bn in cifar.BN_DATAPOINTS:
        out = tmp_path / bn
        assert main(["cifar", "--out", str(out), *common, "--bn-datapoint", bn]) == 0
        res[bn] = json.loads((out / "results.json").read_text())
        summary[bn] = (out / "summary.md").read_text()
        assert res[bn]["config"]["bn_datapoint"] == bn
        assert res[bn]["archs"]["SeLU"]["datapoint"] == "image"
        assert (
            res[bn]["archs"]["batch-ReLU"]["datapoint"] == {"frozen": "image", "batch": "set"}[bn]
        )
        assert f"`--bn-datapoint {bn}`" in summary[bn] and "B = 1,438 here" in summary[bn]
        # The GSC and the effective depth over the whole set are gscfast's in that mode.
        config = res[bn]["config"]
        x, y = cifar.load_data(config)
        model = cifar.make_model("batch-ReLU", config, x.shape[1])
        h0 = res[bn]["archs"]["batch-ReLU"]["history"][0]
        a = gscfast.analyze(model, x, y, error="kl", batchnorm=bn, backend="torch")
        assert h0["gsc"] == pytest.approx(a.gsc.tolist(), rel=1e-5)
        _, prof = gscfast.effective_depth(
            model, copy.deepcopy(model), x, y, error="kl", batchnorm=bn, backend="torch"
        )
        assert h0["profile_full"][0] == pytest.approx(float(prof[-1, 0]), rel=1e-5)
        # Taylor curve: the frozen function (K = 0 is the training error), or eval mode.
        a = res[bn]["archs"]["batch-ReLU"]
        assert a["taylor"]["error_rate"][0] == a["final_error" if bn == "frozen" else "eval_error"]
    assert "each image is one datapoint" in summary["frozen"]
    assert "**one datapoint**" in summary["batch"]
    # The subset's effective depth too: c(L, 0) of one coupled datapoint is the whole set's gradient
    # norm, about sqrt(100) times the per-image quadratic mean; nothing changes without batch norm.
    first = {
        bn: {a: r["archs"][a]["history"][0] for a in ("batch-ReLU", "SeLU")}
        for bn, r in res.items()
    }
    for key in ("profile_subset", "profile_full", "gsc"):
        assert first["frozen"]["SeLU"][key] == first["batch"]["SeLU"][key]
    bn_relu = {bn: f["batch-ReLU"] for bn, f in first.items()}
    assert bn_relu["batch"]["profile_subset"][0] > 3 * bn_relu["frozen"]["profile_subset"][0]
    std = {bn: [v for v in h["preact_std"] if v is not None] for bn, h in bn_relu.items()}
    assert std["frozen"] == pytest.approx(std["batch"], rel=1e-5)  # the same forward values
    # Part of the run's configuration: resuming with the other form is refused as another run.
    capsys.readouterr()
    assert (
        main(
            [
                "cifar",
                "--out",
                str(tmp_path / "frozen"),
                *common,
                "--bn-datapoint",
                "batch",
                "--resume",
            ]
        )
        == 2
    )
    assert "bn_datapoint 'frozen' there, 'batch' here" in "".join(capsys.readouterr())
    assert json.loads((tmp_path / "frozen" / "results.json").read_text()) == res["frozen"]
    assert cifar.make_config()["bn_datapoint"] == "frozen"
    with pytest.raises(ValueError, match="bn_datapoint must be one of"):
        cifar.make_config(bn_datapoint="coupled")


def test_ray_engine_gives_the_local_numbers(full, archive, tmp_path):
    pytest.importorskip("ray", reason="Ray is optional (pip install 'gscfast[ray]')")
    out = tmp_path / "ray"
    assert main(["cifar", "--out", str(out), *archive, "--engine", "ray", "--num-cpus", "2"]) == 0
    engines = {
        json.loads(p.read_text())["engine"]
        for ph in ("search", "final")
        for p in (out / ph / "jobs").iterdir()
    }
    assert engines == {"ray"}
    assert numbers(out) == numbers(full)


@pytest.mark.parametrize("bn", ["frozen", "batch"])
def test_effective_depth_of_a_trained_network_is_measured_in_float64(bn):
    """After training, the order-lambda contributions of a deep network fall far below float32's
    range (weights moved by 1e-2 over 30 layers: order 24 near 1e-86), and gscfast refuses such
    float32 results: the study stopped at its first measured epoch of a 50-layer network. It
    measures effective depth on float64 copies; the profile is the float64 call's."""
    config = cifar.make_config(
        dataset="digits", depth=30, width=12, ed_samples=0, ed_every=1, bn_datapoint=bn
    )
    model = cifar.make_model("batch-tanh", config, 64)
    init = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-2 * torch.randn(p.shape, generator=g))
    x = torch.randn(64, 64, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    with pytest.raises(gscfast.NumericalError, match="underflow"):
        gscfast.effective_depth(model, init, x, y, error="kl", batchnorm=bn)
    m = cifar._measure(config, model, init, x, y, None, 1, 1)
    d, prof = gscfast.effective_depth(
        copy.deepcopy(model).double(),
        copy.deepcopy(init).double(),
        x.double(),
        y,
        error="kl",
        batchnorm=bn,
    )
    assert m["ed_full"] == d
    got = torch.tensor(m["profile_full"], dtype=torch.float64)
    torch.testing.assert_close(got, prof[-1], rtol=0, atol=0, equal_nan=True)
    assert min(v for v in m["profile_full"] if v == v) < 1e-40  # float32 would not hold it
