"""The shattered-gradients study at tiny scale: every output file, resume without recomputing,
refusal of a foreign directory, the looks-linear net's constant gradient, the gradient function
against torch.func, and the depth dependence of the autocorrelation (a property of the nets)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _study_results import numbers as _numbers

import gscfast
from gscfast.__main__ import main
from gscfast.experiments import shattered
from gscfast.experiments.runner import job_seed

ARCHS = ["ReLU-1", "ReLU-4", "batch-ReLU-4", "resnet-6", "preresnet-5"]
ALL = ARCHS + ["ll-ReLU-6"]  # --looks-linear adds the looks-linear net of the deepest depth
ENSEMBLE, CHUNK, POINTS, WIDTH = 6, 4, 24, 12
ARGS = [
    "--archs",
    *ARCHS,
    "--looks-linear",
    "--ensemble",
    str(ENSEMBLE),
    "--chunk",
    str(CHUNK),
    "--points",
    str(POINTS),
    "--width",
    str(WIDTH),
    "--threads",
    "1",
    "--quiet",
]
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
        # The wide-net theory exists for the plain ReLU nets only, Theorem 3's variance for resnets.
        assert (a["wide_R"] is not None) == (a["kind"] == "ReLU")
        assert (a["theorem3_variance"] is not None) == (a["kind"] in ("resnet", "preresnet"))
        if arch.startswith("ll-"):  # constant along the grid: no autocorrelation, R = 1
            assert a["constant_members"] == ENSEMBLE and a["acf_lag1"] is None
            assert a["mean_R"] == pytest.approx(1.0, abs=1e-9) and a["predicted"] == 1.0
        else:
            assert a["constant_members"] == 0 and len(a["acf"]) == POINTS
            assert a["acf"][0] == 1.0 and -1.0 <= a["acf_lag1"] <= 1.0
    assert res["archs"]["ReLU-4"]["predicted"] == 1 / 16
    assert res["archs"]["resnet-6"]["theory_L"] == 2
    # Theorem 3's model with 2 blocks, beta 1: covariance (1 + 1/2)(1 + 1/4), variance 3.
    assert res["archs"]["resnet-6"]["predicted"] == pytest.approx(1.5 * 1.25 / 3)
    assert res["archs"]["preresnet-5"]["theory_L"] == 3 and res["config"]["beta"] == 1.0
    assert res["archs"]["preresnet-5"]["theorem3_variance"] == 4.0
    assert len(res["archs"]["ReLU-4"]["wide_R_by_lag"]) == POINTS
    assert len(res["noise"]["white"]) == len(res["noise"]["brown"]) == POINTS

    rows = (full / "gradients.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["arch", "member", "net_seed", "g_0"]
    assert len(rows) == 1 + len(ALL) * ENSEMBLE and all(
        len(r.split(",")) == 3 + POINTS for r in rows
    )
    # The CSV holds exactly the gradients the records hold, in member order.
    first = json.loads((full / "jobs" / "ReLU-4.00000.json").read_text())["result"]["gradients"][1]
    row = next(r for r in rows if r.startswith("ReLU-4,1,"))
    assert [float(v) for v in row.split(",")[3:]] == first

    summary = (full / "summary.md").read_text()
    assert f"gscfast {gscfast.__version__}" in summary
    for text in (
        "| network | L | paper's prediction | mean R(i, j)",
        "| ReLU-1 | 1 | 0.5 (1/2^L) |",
        "| resnet-6 | 2 |",
        "| preresnet-5 | 3 |",
        "| ll-ReLU-6 |",
        "constant",
        "(choice)",
        "white noise",
        "brown noise",
        "point by point",
        "Theorem 1 (covariance",
        "Theorem 3",
        "wide-net theory",
        "1 + n beta^2",
        "seconds per initialization",
        "Machine:",
        '"ensemble": 6',
        '"beta": 1.0',
        "gradients.csv",
    ):
        assert text in summary, text


def test_resume_of_a_complete_run_only_regenerates(full, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(full, out)
    for name in OUTPUTS:
        (out / name).unlink()
    monkeypatch.setattr(
        shattered, "run_job", lambda *a: pytest.fail("a finished job was recomputed")
    )
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
    assert study(tmp_path / "c", args=["--archs", "preresnet-2", "--quiet"]) == 2
    assert "at least 3" in capsys.readouterr().err
    assert study(tmp_path / "d", args=["--beta", "-1", "--quiet"]) == 2
    assert "beta" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcd")


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


@pytest.mark.parametrize("arch", ["ReLU-5", "resnet-6", "preresnet-5"])
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
        frozen = gscfast.nn.freeze_batchnorm(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert torch.allclose(g, ref, rtol=1e-11, atol=1e-12), (g - ref).abs().max()
    if "resnet" in arch:
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
        g = np.stack(
            [
                shattered.input_gradients(shattered.make_model(arch, 64, seed=s), x).numpy()
                for s in range(4)
            ]
        )
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


def test_preresnet_is_theorem3_module():
    """preresnet-L: a stem, L - 2 blocks x + beta Linear(ReLU(BN(x))) with He weights, a head."""
    model = shattered.make_model("preresnet-6", 16, seed=2, beta=0.25)
    blocks = list(model)[1:-1]
    assert len(blocks) == 4 and all(
        isinstance(b, gscfast.nn.Residual) and b.scale == 0.25 for b in blocks
    )
    assert [type(m) for m in blocks[0].body] == [
        torch.nn.BatchNorm1d,
        torch.nn.ReLU,
        torch.nn.Linear,
    ]
    assert not blocks[0].body[0].affine
    assert next(iter(model)).weight.shape == (16, 1) and list(model)[-1].weight.shape == (1, 16)


def test_theorem3_formulas():
    """Theorem 3: variance beta^2 (L - 1) + 1 (L - 1 blocks), correlation ~ 1/(beta sqrt(L))."""
    assert shattered.theorem3_variance(24, 0.5) == 1 + 24 * 0.25
    assert shattered.theorem3_correlation(0) == 1.0
    assert shattered.theorem3_correlation(1) == pytest.approx(1.5 / 2)
    # Large depth: 1/(beta sqrt(n)) up to beta Gamma(c) / Gamma(c + 1/2), c = 1/beta^2.
    n = 10**5
    assert shattered.theorem3_correlation(n) * math.sqrt(n) == pytest.approx(
        2 / math.sqrt(math.pi), rel=1e-3
    )
    assert shattered.theorem3_correlation(n, 0.1) * 0.1 * math.sqrt(n) == pytest.approx(
        1.0, rel=5e-3
    )
    assert shattered.predicted_correlation("preresnet-26", 0.1) == shattered.theorem3_correlation(
        24, 0.1
    )


def _gradients(arch: str, width: int, x: torch.Tensor, members: int, **kw) -> np.ndarray:
    return np.stack(
        [
            shattered.input_gradients(shattered.make_model(arch, width, s, **kw), x).numpy()
            for s in range(members)
        ]
    )


def test_theorem3_holds_for_its_module_where_batch_norm_rescales_as_it_assumes():
    """With few blocks (or a small beta) the measured variance is near Theorem 3(a) and the mean
    R(i, j) near Theorem 3's correlation; the two-layer post-activation resnet with the same number
    of blocks is not Theorem 3's module and misses it."""
    x = shattered.grid(32, -2.0, 2.0)
    R = {}
    for arch, beta in (("preresnet-4", 1.0), ("resnet-6", 1.0), ("preresnet-14", 0.1)):
        g = _gradients(arch, 64, x, 40, beta=beta)
        R[arch] = shattered._mean_off_diagonal(shattered.correlation_matrix(g))
    assert R["preresnet-4"] == pytest.approx(shattered.theorem3_correlation(2), abs=0.08), R
    assert abs(R["resnet-6"] - shattered.theorem3_correlation(2)) > 0.15, R
    assert R["preresnet-14"] == pytest.approx(shattered.theorem3_correlation(12, 0.1), abs=0.06), R


def test_wide_relu_correlation_without_biases_is_exact():
    """Depth 1, no biases: the gradient is sum_k v_k w_k [w_k x > 0], the same on each side of 0
    and independent across it: R = 1 for points of one sign, 0 across 0."""
    x = np.linspace(-2, 2, 8)
    R = shattered.wide_relu_correlation(x, 1, bias_std=0.0)
    same = np.sign(x)[:, None] == np.sign(x)[None, :]
    assert np.allclose(R[same], 1.0, atol=1e-6) and np.allclose(R[~same], 0.0, atol=1e-6)


def test_plain_relu_nets_follow_the_wide_theory_not_two_to_the_minus_depth():
    """A wide ReLU-3's measured R(i, j) matches the exact infinite-width correlation of the setup,
    far above Theorem 1's 1/2^3, whose independence assumption fails on a 1-D grid."""
    x = shattered.grid(32, -2.0, 2.0)
    g = _gradients("ReLU-3", 256, x, 200)
    R = shattered.correlation_matrix(g)
    wide = shattered.wide_relu_correlation(x[:, 0].numpy(), 3)
    assert np.abs(R - wide).max() < 0.25
    assert shattered._mean_off_diagonal(R) == pytest.approx(
        shattered._mean_off_diagonal(wide), abs=0.05
    )
    assert np.diagonal(R, 1).mean() == pytest.approx(np.diagonal(wide, 1).mean(), abs=0.02)
    # Neighbouring points share their activation patterns: R(i, i+1) near 1, not 1/2^3; far
    # apart the gradients are anti-correlated (the theory says so too).
    assert np.diagonal(R, 1).mean() > 0.9 > 7 * shattered.predicted_correlation("ReLU-3")
    assert R[0, -1] < -0.2 and wide[0, -1] < -0.2
