"""The shattered-gradients study at tiny scale: every output file, resume without recomputing,
refusal of a foreign directory, the looks-linear net's constant gradient, the gradient function
against torch.func, and the depth dependence of the autocorrelation (a property of the nets)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gscfast
from gscfast.__main__ import main
from gscfast.experiments import shattered
from gscfast.experiments.runner import job_seed
from _study_results import numbers as _numbers

ARCHS = ["ReLU-1", "ReLU-4", "batch-ReLU-4", "resnet-6"]
ALL = ARCHS + ["ll-ReLU-6"]  # --looks-linear adds the looks-linear net of the deepest depth
ENSEMBLE, CHUNK, POINTS, WIDTH = 6, 4, 24, 12
ARGS = ["--archs", *ARCHS, "--looks-linear", "--ensemble", str(ENSEMBLE), "--chunk", str(CHUNK),
        "--points", str(POINTS), "--width", str(WIDTH), "--threads", "1", "--quiet"]
OUTPUTS = ["shattered.png", "shattered.pdf", "results.json", "gradients.csv", "summary.md"]


def study(out: Path, *extra: str, args: list[str] = ARGS) -> int:
    return main(["shattered", "--out", str(out), *args, *extra])


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shattered") / "run"
    assert study(out) == 0
    return out


def test_every_output_file(full):
    assert sorted(p.name for p in full.iterdir()) == sorted(OUTPUTS + ["manifest.json", "jobs"])
    chunks = -(-ENSEMBLE // CHUNK)
    assert len(list((full / "jobs").iterdir())) == len(ALL) * chunks
    assert (full / "shattered.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (full / "shattered.pdf").read_bytes()[:5] == b"%PDF-"

    res = json.loads((full / "results.json").read_text())
    assert res["config"]["archs"] == ALL and res["gscfast_version"] == gscfast.__version__
    assert res["x"][0] == -2.0 and res["x"][-1] == 2.0 and len(res["x"]) == POINTS
    assert set(res["seconds"]) == {p.stem for p in (full / "jobs").iterdir()}
    for arch in ALL:
        a = res["archs"][arch]
        assert len(a["R_by_lag"]) == POINTS and a["R_by_lag"][0] == pytest.approx(1.0)
        assert -1.0 <= a["mean_R"] <= 1.0 and a["mean_R_se"] >= 0
        assert len(a["example"]["gradient"]) == POINTS
        assert a["net_seeds"] == [job_seed(0, "net", arch, m) for m in range(ENSEMBLE)]
        assert a["method"] == ("torch.func" if arch.startswith("ll-") else "gscfast")
        if arch.startswith("ll-"):  # constant along the grid: no autocorrelation, R = 1
            assert a["constant_members"] == ENSEMBLE and a["acf_lag1"] is None
            assert a["mean_R"] == pytest.approx(1.0, abs=1e-9) and a["predicted"] == 1.0
        else:
            assert a["constant_members"] == 0 and len(a["acf"]) == POINTS
            assert a["acf"][0] == 1.0 and -1.0 <= a["acf_lag1"] <= 1.0
    assert res["archs"]["ReLU-4"]["predicted"] == 1 / 16
    assert res["archs"]["resnet-6"]["theory_L"] == 2
    assert res["archs"]["resnet-6"]["predicted"] == pytest.approx(2 ** -0.5)
    assert len(res["noise"]["white"]) == len(res["noise"]["brown"]) == POINTS

    rows = (full / "gradients.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["arch", "member", "net_seed", "g_0"]
    assert len(rows) == 1 + len(ALL) * ENSEMBLE and all(len(r.split(",")) == 3 + POINTS for r in rows)
    # The CSV holds exactly the gradients the records hold, in member order.
    first = json.loads((full / "jobs" / "ReLU-4.00000.json").read_text())["result"]["gradients"][1]
    row = next(r for r in rows if r.startswith("ReLU-4,1,"))
    assert [float(v) for v in row.split(",")[3:]] == first

    summary = (full / "summary.md").read_text()
    assert f"gscfast {gscfast.__version__}" in summary
    for text in ("| network | L | predicted | mean R(i, j)", "| ReLU-1 | 1 | 0.5 (1/2^L) |",
                 "| resnet-6 | 2 |", "| ll-ReLU-6 |", "constant", "(choice)", "white noise",
                 "brown noise", "Which number is the prediction's", "seconds per initialization",
                 "Machine:", '"ensemble": 6', "gradients.csv"):
        assert text in summary, text


def test_resume_of_a_complete_run_only_regenerates(full, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(full, out)
    for name in OUTPUTS:
        (out / name).unlink()
    monkeypatch.setattr(shattered, "run_job", lambda *a: pytest.fail("a finished job was recomputed"))
    assert study(out, "--resume") == 0
    assert _numbers(out, "gradients.csv") == _numbers(full, "gradients.csv")
    assert all((out / name).stat().st_size > 0 for name in OUTPUTS)


def test_refuses_a_foreign_or_occupied_directory(full, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert study(foreign, "--resume") == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written
    assert study(full) == 2  # a finished run, without --resume
    assert "not empty" in capsys.readouterr().err


def test_bad_options_are_clear_errors(tmp_path, capsys):
    assert study(tmp_path / "a", args=["--archs", "resnet-5", "--quiet"]) == 2
    assert "even and at least 4" in capsys.readouterr().err
    assert study(tmp_path / "b", args=["--ensemble", "1", "--quiet"]) == 2
    assert "ensemble" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_looks_linear_gradient_is_constant():
    """CReLU with mirrored weights: exactly affine at initialization, unlike the plain ReLU net."""
    x = shattered.grid(256, -2.0, 2.0)
    ll = shattered.make_model("ll-ReLU-30", 64, seed=3)
    g = shattered.input_gradients(ll, x)
    assert shattered.gradient_method(ll) == "torch.func"
    assert (g.max() - g.min()) <= 1e-12 * g.abs().max()  # float64 rounding only
    with torch.no_grad():
        y = ll(x)[:, 0]
    assert torch.allclose(y, y[0] + g[0] * (x[:, 0] - x[0, 0]), rtol=0, atol=1e-12 * y.abs().max())
    relu = shattered.make_model("ReLU-30", 64, seed=3)
    g = shattered.input_gradients(relu, x)
    assert (g.max() - g.min()) > 0.1 * g.abs().max()


@pytest.mark.parametrize("arch", ["ReLU-5", "resnet-6"])
def test_gradients_agree_with_torch_func(arch):
    """gscfast.jacobian (batchnorm="frozen") against torch.func on the same function, float64."""
    x = shattered.grid(40, -2.0, 2.0)
    model = shattered.make_model(arch, 24, seed=11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = shattered.input_gradients(model, x)
    assert shattered.gradient_method(model) == "gscfast"
    if arch.startswith("ReLU"):  # no batch norm: plain per-sample vmap(jacrev)
        ref = torch.func.vmap(torch.func.jacrev(model))(x)[:, 0, 0]
    else:
        ref = shattered.input_gradients(model, x, method="torch.func")
        frozen = shattered.freeze_batchnorm(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert torch.allclose(g, ref, rtol=1e-11, atol=1e-12), (g - ref).abs().max()
    if arch.startswith("resnet"):
        with torch.no_grad():  # the frozen function is the network's function on this grid
            assert torch.allclose(frozen(x), model(x), rtol=1e-13, atol=1e-13)


def test_autocorrelation_estimator():
    acf = shattered.autocorrelation(np.array([[1.0, -1.0] * 8, [2.0] * 16, list(range(16))]))
    assert acf[0, 0] == 1.0 and acf[0, 1] == pytest.approx(-15 / 16)
    assert np.isnan(acf[1]).all()  # constant along the grid
    d = np.arange(16) - 7.5
    assert acf[2, 3] == pytest.approx((d[:-3] * d[3:]).sum() / (d * d).sum())


def test_depth_shatters_the_gradients():
    """ACF(1) of a 1-layer ReLU net is near 1 (a random walk), much lower at depth 50, and about
    0 (white noise) for the batch-norm net; the resnet lies in between."""
    x = shattered.grid(128, -2.0, 2.0)
    acf1 = {}
    for arch in ("ReLU-1", "ReLU-50", "batch-ReLU-50", "resnet-50"):
        g = np.stack([shattered.input_gradients(shattered.make_model(arch, 64, seed=s), x).numpy()
                      for s in range(4)])
        acf1[arch] = float(shattered.autocorrelation(g)[:, 1].mean())
    assert acf1["ReLU-1"] > 0.85, acf1
    assert acf1["ReLU-50"] < acf1["ReLU-1"] - 0.25, acf1
    assert abs(acf1["batch-ReLU-50"]) < 0.25, acf1
    assert acf1["batch-ReLU-50"] + 0.1 < acf1["resnet-50"] < acf1["ReLU-1"] - 0.2, acf1


def test_chunking_does_not_change_the_members():
    a = shattered.make_study(shattered.make_config(archs=["ReLU-1"], ensemble=7, chunk=3))
    b = shattered.make_study(shattered.make_config(archs=["ReLU-1"], ensemble=7, chunk=7))
    assert [s for j in a.jobs for s in j.spec["net_seeds"]] == b.jobs[0].spec["net_seeds"]
    assert [j.key for j in a.jobs] == ["ReLU-1.00000", "ReLU-1.00003", "ReLU-1.00006"]
