"""The ``vgg`` study end to end at tiny scale on a generated CIFAR-100 archive: every output file,
interruption + ``--resume`` bit for bit, GradientFlow leaving training and the model unchanged,
the networks' layer counts and shared initialization, and the command's refusals."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gscfast
from gscfast.data.cifar import write_fake_archive
from gscfast.experiments import EngineError, ResultsDirError, UsageError, vgg
from gscfast.flow import GradientFlow
from gscfast.nn import Residual

VARIANTS = ["VGG08", "VGG38-BN-RC"]
EPOCHS, BATCH, FLOW_EVERY = 2, 10, 3
N_TRAIN, N_VAL, N_TEST = 60, 20, 20
STEPS = (N_TRAIN - N_VAL) // BATCH  # per epoch
RECORDED = [0, 3, 6, 7]  # every 3 steps and the last (2 epochs x 4 steps)


def cli(argv: list[str]) -> int:
    """``gscfast vgg ARGS`` through the study's own parser (as ``gscfast.__main__`` runs it)."""
    p = argparse.ArgumentParser()
    vgg.add_arguments(p)
    try:
        return vgg.main(p.parse_args(argv))
    except (ResultsDirError, EngineError, UsageError):
        return 2


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("cifar100")
    md5 = write_fake_archive(root, "cifar100", "python", n_train=N_TRAIN, n_test=N_TEST, seed=3)
    return [
        "--data-dir",
        str(root),
        "--data-md5",
        md5,
        "--archs",
        *VARIANTS,
        "--epochs",
        str(EPOCHS),
        "--filters",
        "4",
        "--val-size",
        str(N_VAL),
        "--batch-size",
        str(BATCH),
        "--flow-every",
        str(FLOW_EVERY),
        "--threads",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def full(tmp_path_factory, archive) -> Path:
    out = tmp_path_factory.mktemp("vgg") / "run"
    assert cli(["--out", str(out), *archive]) == 0
    return out


def _strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def numbers(d: Path) -> dict:
    """Every output number but wall-clock times."""
    rows = list(csv.reader(io.StringIO((d / "epochs.csv").read_text())))
    keep = [i for i, c in enumerate(rows[0]) if not c.startswith("t_")]
    return {
        "results": _strip_seconds(json.loads((d / "results.json").read_text())),
        "jobs": {
            p.name: _strip_seconds(json.loads(p.read_text())["result"])
            for p in sorted((d / "jobs").iterdir())
        },
        "epochs": [[r[i] for i in keep] for r in rows],
        "flow": (d / "flow.csv").read_text(),
        "gsc": (d / "gsc.csv").read_text(),
        **{f"flow-{v}": (d / f"flow-{v}.json").read_text() for v in VARIANTS},
    }


def _strict(text: str):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def test_every_output_file(full):
    figures = ["curves", "flow-comparison", "gsc", *(f"flow-{v}" for v in VARIANTS)]
    expected = {
        "results.json",
        "summary.md",
        "epochs.csv",
        "flow.csv",
        "gsc.csv",
        "manifest.json",
        "jobs",
        "checkpoints",
        *(f"flow-{v}.json" for v in VARIANTS),
        *(f"{f}.{e}" for f in figures for e in ("png", "pdf")),
    }
    assert {p.name for p in full.iterdir()} == expected
    for f in figures:
        assert (full / f"{f}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (full / f"{f}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not [p for p in full.rglob("*") if ".tmp" in p.name]  # every write completed atomically

    res = _strict((full / "results.json").read_text())
    assert res["study"] == "vgg" and res["gscfast_version"] == gscfast.__version__
    assert res["config"]["archs"] == VARIANTS and res["config"]["epochs"] == EPOCHS
    cos = 2e-5 + (1e-3 - 2e-5) * (1 + math.cos(math.pi / EPOCHS)) / 2  # the rate of epoch 2
    for v, layers in zip(VARIANTS, (8, 38)):
        a = res["variants"][v]
        assert (
            a["weight_layers"] == layers and a["diverged"] is False and a["epochs_done"] == EPOCHS
        )
        assert (a["n_train"], a["n_val"], a["n_test"], a["steps_per_epoch"]) == (
            N_TRAIN - N_VAL,
            N_VAL,
            N_TEST,
            STEPS,
        )
        hist = a["history"]
        assert [h["epoch"] for h in hist] == [1, 2]
        assert [h["lr"] for h in hist] == pytest.approx([1e-3, cos], rel=1e-12)
        for h in hist:
            assert all(0 <= h[k] <= 1 for k in ("train_acc", "val_acc"))
            assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
            assert h["seconds"]["train"] > 0
        assert a["final"] == {
            k: hist[-1][k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")
        }
        assert 0 <= a["test_acc"] <= 1 and a["test_loss"] > 0
        assert a["best_val_acc"] == max(h["val_acc"] for h in hist)
        assert (a["flow"]["first_step"], a["flow"]["last_step"]) == (0, RECORDED[-1])
        assert a["flow"]["output"] == "logits.weight"

    epochs = list(csv.DictReader(io.StringIO((full / "epochs.csv").read_text())))
    assert len(epochs) == len(VARIANTS) * EPOCHS
    assert (
        float(epochs[0]["val_acc"]) == res["variants"]["VGG08"]["history"][0]["val_acc"]
    )  # exact text

    flow_rows = list(csv.DictReader(io.StringIO((full / "flow.csv").read_text())))
    assert len(flow_rows) == len(RECORDED) * (8 + 38)
    for v in VARIANTS:
        f = _strict((full / f"flow-{v}.json").read_text())
        assert f["variant"] == v and f["every"] == FLOW_EVERY and f["steps_per_epoch"] == STEPS
        assert sorted(map(int, f["records"])) == RECORDED
        model = vgg.make_model(v, res["config"])
        names = [n for n, p in model.named_parameters() if p.dim() >= 2]
        assert f["weights"] == names
        for rec in f["records"].values():
            assert list(rec["weights"]) == names  # input to output
            assert all(
                s["mean_abs"] > 0 and s["norm"] >= s["mean_abs"] for s in rec["weights"].values()
            )
        rows = [r for r in flow_rows if r["variant"] == v and r["step"] == "7"]
        assert [r["weight"] for r in rows] == names and {r["epoch"] for r in rows} == {"2"}
        assert float(rows[0]["mean_abs"]) == f["records"]["7"]["weights"][names[0]]["mean_abs"]

    # GSC(l, 0) at the block boundaries: at initialization as gscfast.gsc measures the fresh
    # model on the first training images; at every recorded step; one CSV row per boundary
    data = vgg.load_data(res["config"])
    gsc_rows = list(csv.DictReader(io.StringIO((full / "gsc.csv").read_text())))
    for v, L in zip(VARIANTS, (5, 20)):  # the input unit, the blocks and the logits
        model = vgg.make_model(v, res["config"])
        layers = vgg.block_boundaries(model)
        assert layers[0] == "input" and layers[-1] == "stage2_reduce" and len(layers) == L - 1
        x, y = (t[: N_TRAIN - N_VAL] for t in data["train"])  # --gsc-size 100 > the 40 images
        want = gscfast.gsc_moments(model, x, y, error="kl", batchnorm="frozen", layers=layers)
        g = res["variants"][v]["gsc"]
        assert g["L"] == L and g["n_images"] == N_TRAIN - N_VAL and g["layers"] == layers
        assert g["init"]["gsc"] == pytest.approx(want.gsc().tolist(), rel=1e-12, abs=0)
        assert g["init"]["input"] == g["init"]["gsc"][L] and g["init"]["step"] is None
        f = _strict((full / f"flow-{v}.json").read_text())
        for rec in f["records"].values():
            assert len(rec["gsc"]) == L + 1 and rec["gsc"][0] == 1
            assert all(c > 0 for c in rec["gsc"])
        assert g["last"]["gsc"] == f["records"][str(RECORDED[-1])]["gsc"]
        rows = [r for r in gsc_rows if r["variant"] == v]
        assert len(rows) == (1 + len(RECORDED)) * (L + 1)
        assert [r["boundary"] for r in rows[: L + 1]] == ["error", "logits", *reversed(layers)]
        assert {r["step"] for r in rows[: L + 1]} == {"init"}
        assert [float(r["gsc"]) for r in rows[: L + 1]] == g["init"]["gsc"]  # exact text

    summary = (full / "summary.md").read_text()
    for part in (
        "## Results",
        "## Gradient flow",
        "## Gradient scale coefficient",
        "### Against the coursework's finding",
        "gsc.png",
        "## Timings",
        "## How the numbers are made",
        "## Configuration",
        "## Files",
        "Machine:",
        "| VGG08 | 8 |",
        "| VGG38-BN-RC | 38 |",
        "flow-VGG38-BN-RC.png",
        "curves.png",
        "flow.csv",
        "epochs.csv",
        "results.json",
    ):
        assert part in summary, part
    ck = vgg.load_checkpoint(full / "checkpoints" / "VGG08.pt")  # weights_only=True
    assert ck["epoch"] == EPOCHS
    assert {"model", "optimizer", "scheduler", "rng", "history", "flow", "state"} <= set(ck)


def test_interrupted_and_resumed_run_gives_the_same_numbers(full, archive, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(vgg, "_INTERRUPT_AFTER", 1)  # a kill right after every epoch's checkpoint
    calls, status = 0, 130
    while status == 130:
        status = cli(["--out", str(out), *archive, *(["--resume"] if calls else [])])
        calls += 1
        assert calls < 10
    assert status == 0 and calls == len(VARIANTS) * (EPOCHS - 1) + 1
    assert numbers(out) == numbers(full)


def _tiny_training(model: nn.Module, flow: GradientFlow | None, steps: int = 3) -> dict[int, dict]:
    """A few Adam steps on seeded data; the gradients autograd gave, per step."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    grads = {}
    for i in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 100, (4,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        grads[i] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        if flow is not None:
            flow.step()
    return grads


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster (and reproducibly) on one thread."""
    from gscfast.experiments.runner import thread_limit

    with thread_limit(1):
        yield


def test_gradient_flow_leaves_model_and_training_unchanged(one_thread):
    config = vgg.make_config(filters=4)
    plain, watched = vgg.make_model("VGG38-BN-RC", config), vgg.make_model("VGG38-BN-RC", config)
    params = [id(p) for p in watched.parameters()]
    _tiny_training(plain, None)
    with GradientFlow(watched, every=2) as flow:
        grads = _tiny_training(watched, flow)
    for (k, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), k  # same weights, BN statistics and step counts
    assert [id(p) for p in watched.parameters()] == params and watched.training
    assert all(not p._post_accumulate_grad_hooks for p in watched.parameters())  # hooks gone
    assert sorted(flow.records) == [0, 2]
    for step, rec in flow.records.items():
        assert len(rec["weights"]) == 38
        for name, s in rec["weights"].items():
            assert s["mean_abs"] == pytest.approx(float(grads[step][name].abs().mean()), rel=1e-6)
            assert s["norm"] == pytest.approx(float(grads[step][name].norm()), rel=1e-6)


def test_layer_counts_and_shared_initialization(one_thread):
    config = vgg.make_config(filters=8)
    state = torch.get_rng_state()
    models = {v: vgg.make_model(v, config) for v in vgg.VARIANTS}
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    x = torch.randn(2, 3, 16, 16)
    for v, m in models.items():
        blocks, bn, rc = vgg.VARIANTS[v]
        convs = sum(isinstance(t, nn.Conv2d) for t in m.modules())
        assert vgg.weight_layers(m) == convs + 1 == (8 if v == "VGG08" else 38)
        assert sum(isinstance(t, nn.BatchNorm2d) for t in m.modules()) == (convs if bn else 0)
        assert sum(isinstance(t, Residual) for t in m.modules()) == (3 * blocks if rc else 0)
        assert sum(isinstance(t, nn.AvgPool2d) for t in m.modules()) == 3
        assert all(t.bias is None for t in m.modules() if isinstance(t, nn.Conv2d))
        assert m(x).shape == (2, 100)
    # VGG38 and its -BN, -RC, -BN-RC variants start from the same convolution and output weights.
    ref = [p for p in models["VGG38"].parameters()]
    for v in ("VGG38-BN", "VGG38-RC", "VGG38-BN-RC"):
        ws = [p for p in models[v].parameters() if p.dim() >= 2 or p.shape == (100,)]
        assert len(ws) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, ws))
    w = models["VGG08"].input.conv0.weight
    assert float(w.detach().abs().max()) <= 1 / math.sqrt(
        27
    )  # PyTorch's default bound 1/sqrt(fan_in)
    assert not torch.equal(vgg.vgg(0, filters=8, seed=1).input.conv0.weight, w)


def _config(archive: list[str], **kw) -> dict:
    """A one-variant (VGG08) configuration on the generated archive, with ``kw`` changed."""
    ix = archive.index
    base = dict(
        archs=["VGG08"],
        epochs=1,
        filters=4,
        val_size=N_VAL,
        batch_size=BATCH,
        data_dir=archive[ix("--data-dir") + 1],
        data_md5=archive[ix("--data-md5") + 1],
        device="cpu",
    )
    return vgg.make_config(**{**base, **kw})


def test_progress_lines(archive, monkeypatch, capfd, one_thread):
    config = _config(archive)
    monkeypatch.setattr(vgg, "_PROGRESS", True)
    r = vgg.train_variant(config, {"variant": "VGG08", "checkpoint": None})
    err = capfd.readouterr().err
    assert "VGG08 epoch 1/1: train loss" in err and "val loss" in err
    assert r["epochs_done"] == 1 and sorted(map(int, r["flow"]["records"])) == [0, STEPS - 1]
    vgg.check_result(config, {}, r)
    assert len(r["gsc"]["init"]["gsc"]) == 6 and all(
        "gsc" in v for v in r["flow"]["records"].values()
    )


def test_no_gsc_with_gsc_size_0(archive, one_thread):
    config = _config(archive, gsc_size=0)
    r = vgg.train_variant(config, {"variant": "VGG08", "checkpoint": None})
    assert r["gsc"]["n_images"] == 0 and r["gsc"]["init"] == {}
    assert not any("gsc" in v for v in r["flow"]["records"].values())
    vgg.check_result(config, {}, r)
    res = vgg.aggregate(config, {"VGG08": {"result": r, "seconds": 1.0}})
    info = {"version": gscfast.__version__, "engine": "local", "threads": 1, "machine": "test"}
    assert "Not measured (`--gsc-size 0`)" in vgg.summary_md(res, info, [])
    bad = dict(r, gsc=dict(r["gsc"], init={"gsc": [1.0]}))
    with pytest.raises(ValueError, match="no images"):
        vgg.check_result(config, {}, bad)


def test_refusals(archive, tmp_path):
    from gscfast.experiments import STUDIES

    assert STUDIES["vgg"] == vgg.__name__ and vgg.NAME == "vgg"  # the `gscfast vgg` command
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("other")
    assert cli(["--out", str(tmp_path / "busy"), *archive]) == 2  # non-empty, no --resume
    assert cli(["--out", str(tmp_path / "a"), *archive, "--archs", "VGG19"]) == 2
    assert cli(["--out", str(tmp_path / "b"), *archive, "--val-size", str(N_TRAIN)]) == 2
    bad = list(archive)
    bad[bad.index("--data-md5") + 1] = "0" * 32
    assert cli(["--out", str(tmp_path / "c"), *bad]) == 2  # wrong checksum: refused before training
    assert not (tmp_path / "c").exists()
    for k, v in (("flow_every", 0), ("epochs", 0), ("lr", 0.0), ("max_train", 1), ("gsc_size", 1)):
        with pytest.raises(ValueError, match=k):
            vgg.make_config(**{k: v})
    with pytest.raises(ValueError, match="VGG19"):
        vgg.make_config(archs=["VGG19"])


def test_diverged_job_is_recorded_not_raised(archive, tmp_path, one_thread):
    config = _config(archive, epochs=3, lr=1e30)
    spec = {"variant": "VGG08", "checkpoint": str(tmp_path / "c.pt")}
    r = vgg.train_variant(config, spec)
    assert r["diverged"] is True and r["epochs_done"] == 1 and r["test_acc"] is None
    assert r["history"][0]["train_loss"] is None  # non-finite, null in strict JSON
    # the GSC of the diverged model is refused (not a NaN curve), with the reason; training went on
    last = r["flow"]["records"][str(max(map(int, r["flow"]["records"])))]
    assert last["gsc"] is None and "finite" in last["gsc_error"]
    assert len(r["gsc"]["init"]["gsc"]) == 6  # the initial model is fine
    vgg.check_result(config, spec, r)
    assert vgg.load_checkpoint(tmp_path / "c.pt")["epoch"] == 1
    res = vgg.aggregate(config, {"VGG08": {"result": r, "seconds": 1.0}})
    assert res["variants"]["VGG08"]["best_val_acc"] is None
    text = vgg.summary_md(
        res,
        {"version": gscfast.__version__, "engine": "local", "threads": 1, "machine": "test"},
        [],
    )
    assert "1 (diverged)" in text and "n/a" in text
    assert "No GSC at the last step of VGG08" in text
