"""The 'ghost' forward/backward-scaling study at quick scale: r(s), the networks, the measured rate
of a plain batch-norm ReLU net against r(s), every output file, resume bit for bit, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _study_results import numbers as _numbers
from torch import nn

import gscfast
from gscfast.__main__ import main
from gscfast.experiments import ghost
from gscfast.nn import Residual
from gscfast.theory import R_S

VARIANTS = ["plain-relu-bn", "res-sqrt-tanh", "plain-selu"]
DEPTH, WIDTH, BATCH, REPEATS, CHUNK = 6, 24, 16, 6, 3
ARGS = [
    "--variants",
    *VARIANTS,
    "--depth",
    str(DEPTH),
    "--width",
    str(WIDTH),
    "--batch",
    str(BATCH),
    "--repeats",
    str(REPEATS),
    "--chunk",
    str(CHUNK),
    "--backend",
    "torch",
    "--threads",
    "1",
    "--quiet",
]
OUTPUTS = ["ghost.png", "ghost.pdf", "results.json", "layers.csv", "summary.md"]


def study(out, *extra: str) -> int:
    return main(["ghost", "--out", str(out), *ARGS, *extra])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("ghost") / "run"
    assert study(out) == 0
    return out


@pytest.mark.parametrize("net", ghost.NETS)
def test_networks(net):
    gen = torch.Generator().manual_seed(0)
    m = ghost.ghost_net(net, "relu", True, width=200, depth=8, generator=gen)
    lins = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert len(lins) == 8 and all(lin.bias is None for lin in lins)
    assert float(lins[1].weight.detach().var()) == pytest.approx(2 / 200, rel=0.05)  # He
    assert float(lins[-1].weight.detach().var()) == pytest.approx(1 / 200, rel=0.05)  # the head
    blocks = [x for x in m if isinstance(x, Residual)]
    assert len(blocks) == (0 if net == "plain" else 3)
    if net == "res-sqrt":
        assert blocks[0].scale == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(ValueError, match="even"):
        ghost.ghost_net("res", "relu", True, depth=7)


def test_weight_grad_norms_are_autograds():
    gen = torch.Generator().manual_seed(1)
    m = ghost.ghost_net("res", "tanh", True, width=8, depth=6, generator=gen, dtype=torch.float64)
    x, g = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    (m(x) * g).sum().backward()
    expected = [mod.weight.grad.norm() for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert torch.allclose(ghost.weight_grad_norms(m, x, g), torch.stack(expected), rtol=1e-12)


def test_plain_batchnorm_relu_rate_within_5_percent_of_r_s(tmp_path):
    """The measured growth of the squared weight-gradient norm matches r(s) = 1.467."""
    out = tmp_path / "rate"
    assert (
        main(
            [
                "ghost",
                "--out",
                str(out),
                "--variants",
                "plain-relu-bn",
                "--depth",
                "12",
                "--width",
                "128",
                "--batch",
                "128",
                "--repeats",
                "32",
                "--chunk",
                "16",
                "--no-gsc",
                "--threads",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    v = json.loads((out / "results.json").read_text())["variants"]["plain-relu-bn"]
    assert v["predicted"] and v["r_s"] == 1.467
    assert v["rate"]["value"] == pytest.approx(1.467, rel=0.05)


def test_every_output(full):
    assert sorted(p.name for p in full.iterdir()) == sorted(OUTPUTS + ["manifest.json", "jobs"])
    assert len(list((full / "jobs").iterdir())) == len(VARIANTS) * REPEATS // CHUNK
    assert (full / "ghost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (full / "ghost.pdf").read_bytes()[:5] == b"%PDF-"
    res = json.loads((full / "results.json").read_text())
    assert list(res["variants"]) == VARIANTS and res["fit_layers"] == list(range(2, DEPTH))
    for name, v in res["variants"].items():
        assert v["repeats"] == REPEATS and v["rate"]["chunks"] == REPEATS // CHUNK
        assert len(v["mean_norm"]) == len(v["mean_sq"]) == DEPTH
        assert all(q >= m * m for m, q in zip(v["mean_norm"], v["mean_sq"]))  # Jensen
        assert v["rate"]["value"] == pytest.approx(ghost.growth_rate(v["mean_sq"], DEPTH))
        g = v["gsc"]  # the pooled GSC of the chunks' first networks, not a mean of their GSCs
        assert (
            len(g["gsc"]) == DEPTH + 1 and g["gsc"][0] == 1.0 and g["datasets"] == REPEATS // CHUNK
        )
        recs = [
            json.loads(p.read_text())["result"] for p in sorted((full / "jobs").glob(f"{name}.*"))
        ]
        pooled = gscfast.pool([gscfast.GSCMoments.from_dict(r["gsc_moments"]) for r in recs])
        assert g["gsc"] == pooled.gsc().tolist()
        assert all(lo <= x <= hi for lo, x, hi in zip(g["gsc_lo"], g["gsc"], g["gsc_hi"]))
        assert v["r_s"] == R_S[v["act"]] and v["predicted"] == (name == "plain-relu-bn")
    rows = (full / "layers.csv").read_text().splitlines()
    assert rows[0] == "variant,l,mean_norm,mean_sq,se_sq,gsc,gsc_lo,gsc_hi"
    assert len(rows) == 1 + len(VARIANTS) * DEPTH
    summary = (full / "summary.md").read_text()
    assert "| plain-relu-bn | He |" in summary and "| plain-selu | LeCun |" in summary
    assert "| res-sqrt-tanh |" in summary and "1.467" in summary


def test_growth_rate_recovers_a_geometric_profile():
    assert ghost.growth_rate([7.0 * 1.3 ** (-l) for l in range(1, 11)], 10) == pytest.approx(1.3)


def test_resume_bit_for_bit_and_refusals(full, tmp_path):
    part = tmp_path / "part"
    assert study(part, "--max-jobs", "2") == 0
    assert len(list((part / "jobs").iterdir())) == 2 and not (part / "results.json").exists()
    assert study(part) == 2  # not empty, no --resume: refused
    assert study(part, "--resume") == 0
    assert _numbers(part, "layers.csv") == _numbers(full, "layers.csv")
    before = (part / "jobs" / f"{VARIANTS[0]}.0000.json").read_bytes()
    assert study(part, "--resume") == 0  # complete: only regenerates the outputs
    assert (part / "jobs" / f"{VARIANTS[0]}.0000.json").read_bytes() == before
    assert main(["ghost", "--out", str(part), *ARGS, "--seed", "1", "--resume"]) == 2  # other run


def test_records_without_gsc_moments_are_refused(full, tmp_path, capsys):
    """A record of an older gscfast (a GSC list instead of the raw expectations) is never mixed in."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(full, out)
    path = out / "jobs" / f"{VARIANTS[0]}.0000.json"
    rec = json.loads(path.read_text())
    rec["result"]["gsc"] = (
        gscfast.GSCMoments.from_dict(rec["result"].pop("gsc_moments")).gsc().tolist()
    )
    path.write_text(json.dumps(rec))
    capsys.readouterr()
    assert study(out, "--resume") == 2
    err = capsys.readouterr().err
    assert "has no 'gsc_moments'" in err and "recompute the run into a new --out" in err, err


@pytest.mark.parametrize(
    "bad",
    [
        ["--variants", "plain-gelu"],
        ["--variants", "res-relu", "--depth", "7"],
        ["--batch", "1"],
        ["--repeats", "0"],
    ],
)
def test_bad_options_are_usage_errors(tmp_path, bad, capsys):
    assert main(["ghost", "--out", str(tmp_path / "x"), *bad, "--quiet"]) == 2
    assert "gscfast ghost: error:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_redrawn_network_equals_a_fresh_one():
    """A job redraws one network per repeat: the same weights as building it anew."""
    fresh = ghost.ghost_net(
        "res-sqrt", "selu", True, width=16, depth=6, generator=torch.Generator().manual_seed(5)
    )
    reused = ghost.ghost_net(
        "res-sqrt", "selu", True, width=16, depth=6, generator=torch.Generator().manual_seed(9)
    )
    ghost.redraw_weights(reused, "selu", torch.Generator().manual_seed(5))
    for a, b in zip(fresh.state_dict().values(), reused.state_dict().values()):
        assert torch.equal(a, b)
