"""GradientFlow records what autograd computes, removes its hooks, and leaves the model alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gscfast
from gscfast.flow import GradientFlow, tensorboard_writer, wandb_writer


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.Tanh(),
        nn.Linear(16, 5),
    )


def train(model, flow, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    grads = {}
    for i in range(steps):
        x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
        nn.functional.cross_entropy(model(x), y).backward()
        grads[i] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        flow.step()
        opt.zero_grad()
    return grads


def test_records_equal_autograd_gradients_and_hooks_are_removed(tmp_path):
    model = conv_net()
    with GradientFlow(model, every=2) as flow:
        grads = train(model, flow)
    assert sorted(flow.records) == [0, 2]
    for step, rec in flow.records.items():
        assert set(rec["weights"]) == {"0.weight", "3.weight", "5.weight"}  # dim >= 2
        for name, s in rec["weights"].items():
            g = grads[step][name]
            assert s["mean_abs"] == pytest.approx(float(g.abs().mean()), rel=1e-6)
            assert s["norm"] == pytest.approx(float(g.norm()), rel=1e-6)
    n = len(flow.records)
    train(model, flow, steps=2)  # outside the context: no hooks, nothing recorded
    assert len(flow.records) == n
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    flow.to_json(tmp_path / "flow.json")
    assert json.loads((tmp_path / "flow.json").read_text())["records"]["2"]["weights"]
    flow.plot(tmp_path / "flow.png")
    assert (tmp_path / "flow.png").stat().st_size > 1000


def test_gsc_of_the_mlp_tail_and_model_untouched():
    model = conv_net()
    bn_model = nn.Sequential(
        nn.Conv2d(3, 2, 3),
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 5),
    )
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,))
    for m in (model, bn_model):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with GradientFlow(m, gsc_data=(x, y)) as flow:
            nn.functional.cross_entropy(m(x), y).backward()
            for k, v in m.state_dict().items():  # the training forward itself updates BN stats
                before[k] = v.clone()
            rec = flow.step()
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        # the longest tail of analytic rules: from the ReLU after the convolution (its flattened
        # feature map is a layer boundary), and from the Flatten after the generic BatchNorm2d
        k = 1 if m is model else 2
        tail = m[k:]
        feats = m[:k](x).detach().flatten(1)
        expected = gscfast.gsc(tail, feats, y, error="kl", batchnorm="frozen")
        assert rec["gsc"] == pytest.approx(expected.tolist(), rel=1e-5)
        assert len(rec["gsc"]) == gscfast.compile_model(tail).L + 1


def test_whole_model_gsc_and_tensorboard_writer():
    model = gscfast.mlp(4, 8, act="tanh", out_features=3, seed=0)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    logged = []

    class FakeSummaryWriter:
        def add_scalar(self, tag, value, step, **precision):
            logged.append((tag, value, step))

    with GradientFlow(
        model, gsc_data=(x, y), writers=[tensorboard_writer(FakeSummaryWriter())]
    ) as flow:
        nn.functional.cross_entropy(model(x), y).backward()
        rec = flow.step()
    assert rec["gsc"] == pytest.approx(gscfast.gsc(model, x, y, error="kl").tolist(), rel=1e-6)
    assert ("gsc/0", 1.0, 0) in logged and any(t.startswith("grad_norm/") for t, _, _ in logged)
    with pytest.raises(ValueError, match="every"):
        GradientFlow(model, every=0)


def test_records_are_in_model_order_on_a_schedule_and_resumable(tmp_path):
    from gscfast.flow import plot_flow

    model = conv_net()
    order = [n for n, p in model.named_parameters() if p.dim() >= 2]
    with GradientFlow(model, every=3, steps={4}, start=2) as flow:  # a run resumed at step 2
        train(model, flow, steps=5)  # steps 2..6
    assert sorted(flow.records) == [3, 4, 6] and flow.step_index == 7
    assert all(list(r["weights"]) == order for r in flow.records.values())  # input to output
    fig = flow.plot(tmp_path / "two.png", steps=[3, 6])
    assert len(fig.axes) == 2 and (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written atomically
    flow.to_json(tmp_path / "flow.json")
    saved = json.loads((tmp_path / "flow.json").read_text())["records"]  # string keys
    fig = plot_flow(saved, [4], titles=["resumed"], labels={order[0]: "conv"})
    assert fig.axes[0].get_title() == "resumed"
    assert fig.axes[0].get_xticklabels()[0].get_text() == "conv"
    with pytest.raises(ValueError, match="no record"):
        plot_flow(saved, [5])
    with pytest.raises(ValueError, match="start"):
        GradientFlow(model, start=-1)


@pytest.mark.parametrize("batchnorm, comparable", [("frozen", True), ("batch", False)])
def test_batch_norm_gsc_does_not_depend_on_the_data_size(batchnorm, comparable):
    """With the KL error summed over one batch datapoint, GSC(L, 0) shrinks like 1/B; the default
    frozen form measures per-sample datapoints and does not."""
    torch.manual_seed(0)
    model = gscfast.mlp(6, 32, act="relu", norm="batch", out_features=5, seed=0)
    x, y = torch.randn(800, 32), torch.randint(0, 5, (800,))
    last = []
    for n in (100, 800):
        with GradientFlow(model, gsc_data=(x[:n], y[:n]), batchnorm=batchnorm) as flow:
            nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
            last.append(flow.step()["gsc"][-1])
            model.zero_grad()
    ratio = max(last) / min(last)
    assert (ratio < 1.5) if comparable else (ratio > 4), (batchnorm, last)


def test_bad_batchnorm_mode_is_refused():
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        GradientFlow(nn.Linear(2, 2), batchnorm="eval")


def test_no_tail_gsc_when_the_container_itself_is_not_plain():
    """A hook on the top Sequential changes the model's output, so the GSC of a tail of its
    children (without the hook) would not be the model's: no GSC rather than a wrong one."""
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,))
    model = conv_net()
    model.register_forward_hook(lambda mod, inp, out: out * 3)
    with GradientFlow(model, gsc_data=(x, y)) as flow:
        nn.functional.cross_entropy(model(x), y).backward()
        rec = flow.step()
    assert rec.get("gsc") is None


# -- the writers against the real TensorBoard and W&B (optional test dependencies) --------------


def expected_scalars(records):
    """What the writers must log: {tag: [(step, value), ...]} in step order, from the records."""
    tags = {}
    for step in sorted(records):
        rec = records[step]
        for name, s in rec["weights"].items():
            tags.setdefault(f"grad_mean_abs/{name}", []).append((step, s["mean_abs"]))
            tags.setdefault(f"grad_norm/{name}", []).append((step, s["norm"]))
        for layer, v in enumerate(rec.get("gsc", [])):
            tags.setdefault(f"gsc/{layer}", []).append((step, v))
    return tags


def flow_with(writer):
    """A resumed run (start=1) of a conv net with an MLP tail GSC on a schedule; the writer sees
    steps 2, 3 and 4."""
    model = conv_net()
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,))
    with GradientFlow(
        model, every=2, steps={3}, start=1, gsc_data=(x, y), writers=[writer]
    ) as flow:
        train(model, flow, steps=4)  # steps 1..4
    assert sorted(flow.records) == [2, 3, 4] and all("gsc" in r for r in flow.records.values())
    return flow


def test_tensorboard_writer_with_a_real_summary_writer(tmp_path):
    """Every tag, step and value the flow records is in the event file, read back by the reader
    TensorBoard itself serves its scalar dashboard from."""
    pytest.importorskip(
        "tensorboard", reason="tensorboard is optional (pip install 'gscfast[test]')"
    )
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "tb") as sw:
        flow = flow_with(tensorboard_writer(sw))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})  # 0: keep all
    events.Reload()
    expected = expected_scalars(flow.records)
    assert sorted(events.PluginTagToContent("scalars")) == sorted(expected)  # on the dashboard
    assert len(expected) == 2 * 3 + len(flow.records[2]["gsc"])  # three weights, GSC(l, 0) each l
    for tag, values in expected.items():
        logged = [(e.step, make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
        assert logged == values, tag


def test_tensorboard_writer_keeps_float64_values(tmp_path):
    """A float64 network's statistics outside float32's range (a saturated deep tanh net gives
    GSC(L, 0) ~ 1e-138 and mean |grad| ~ 1e-74; an exploding one beyond 3.4e38) reach TensorBoard
    as they are, not as 0 or inf, and on its scalar dashboard."""
    pytest.importorskip(
        "tensorboard", reason="tensorboard is optional (pip install 'gscfast[test]')"
    )
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    from torch.utils.tensorboard import SummaryWriter

    record = {
        "weights": {"0.weight": {"mean_abs": 2.1994917744957843e-74, "norm": 0.1}},
        "gsc": [1.0, 6.388455596035586e-138, 1.5e40],
    }
    with SummaryWriter(tmp_path) as sw:
        tensorboard_writer(sw)(7, record)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = {
        tag: [(e.step, make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
        for tag in events.PluginTagToContent("scalars")
    }
    assert logged == {tag: values for tag, values in expected_scalars({7: record}).items()}


def read_wandb_history(run_dir):
    """The history rows {step: {key: value}} of an offline run, read from its transaction log
    (``run-<id>.wandb``: a LevelDB-style log of ``wandb_internal_pb2.Record`` protos in 32 KiB
    blocks, each chunk checksummed). Written here because wandb no longer ships a Python reader."""
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    rows, pos, record = {}, 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, (
            f"bad checksum at {pos} in {path}"
        )
        pos += 7 + n
        record = chunk if kind in (1, 2) else record + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(record)
            if r.WhichOneof("record_type") == "history":
                row = {
                    i.key or ".".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                rows[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def logged_rows(records):
    """The history rows {step: {key: value}} wandb_writer must produce from the records."""
    return {
        step: {
            tag: v
            for tag, values in expected_scalars(records).items()
            for s, v in values
            if s == step
        }
        for step in records
    }


def finished_history(run):
    """Finish ``run`` and read back its history. ``run.finish()`` returns before the W&B service
    has written the whole transaction log; ``wandb.teardown()`` waits for the service to end."""
    import wandb

    run.finish()
    wandb.teardown()
    return read_wandb_history(Path(run.dir).parent)


@pytest.fixture
def offline_wandb_run(tmp_path, monkeypatch):
    """A real W&B run, offline and silent; everything W&B writes (run, logs, settings, cache) stays
    in tmp_path, and the server address is a closed local port, so an attempt to reach it would
    fail rather than leave the machine."""
    wandb = pytest.importorskip("wandb", reason="wandb is optional (pip install 'gscfast[test]')")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": tmp_path,
        "WANDB_CACHE_DIR": tmp_path / "cache",
        "WANDB_CONFIG_DIR": tmp_path / "config",
        "WANDB_DATA_DIR": tmp_path / "data",
        "WANDB_ARTIFACT_DIR": tmp_path / "artifacts",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "",
    }.items():
        monkeypatch.setenv(var, str(value))
    settings = wandb.Settings(
        mode="offline",
        silent=True,
        console="off",
        disable_git=True,
        disable_code=True,
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
    )
    run = wandb.init(project="gscfast-test", dir=tmp_path, settings=settings)
    try:
        yield run
    finally:  # again after finished_history: no-ops; the service process ends with the test
        run.finish()
        wandb.teardown()


@pytest.mark.parametrize("form", ["global", "run"])
def test_wandb_writer_with_a_real_offline_run(offline_wandb_run, form):
    """Every key, step and value the flow records is in the offline run's transaction log (W&B
    logs JSON, so the values come back exactly), through ``wandb.log`` or ``run.log``."""
    run = offline_wandb_run
    flow = flow_with(wandb_writer(run if form == "run" else None))
    assert finished_history(run) == logged_rows(flow.records)


def test_wandb_writer_refuses_a_step_wandb_would_ignore(offline_wandb_run):
    """W&B ignores data logged at a step below its run's current one (a console warning only).
    A loss logged without ``step=`` after ``flow.step()`` shares the flow's step; logged before
    it, W&B's step runs ahead and the flow's record would be lost: refused instead."""
    run = offline_wandb_run
    model = conv_net()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    losses = []
    with GradientFlow(model, writers=[wandb_writer(run)]) as flow:
        for i in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
            if i < 2:
                flow.step()  # W&B at step i
                run.log({"loss": losses[i]})  # step i too, then W&B moves on to i + 1
            else:
                run.log({"loss": losses[i]})  # before flow.step(): W&B moves on to step 3
                with pytest.raises(
                    ValueError, match="W&B's run is at step 3, past GradientFlow's step 2"
                ):
                    flow.step()
            model.zero_grad()
    expected = logged_rows({i: flow.records[i] for i in (0, 1)})
    assert finished_history(run) == {
        0: {**expected[0], "loss": losses[0]},
        1: {**expected[1], "loss": losses[1]},
        2: {"loss": losses[2]},
    }


def test_gsc_of_a_whole_cnn_at_named_boundaries():
    """``gsc_layers``: the GSC of the whole model (convolutions, batch norm in train mode) at the
    named boundaries, as ``gscfast.gsc(..., layers=...)`` gives it; the model is untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    x, y = torch.randn(10, 3, 6, 6), torch.randint(0, 5, (10,))
    names = ["2", "4", "6"]
    with GradientFlow(model, gsc_data=(x, y), gsc_layers=names) as flow:
        nn.functional.cross_entropy(model(x), y).backward()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rec = flow.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    want = gscfast.gsc(model, x, y, error="kl", batchnorm="frozen", layers=names)
    assert rec["gsc"] == pytest.approx(want.tolist(), rel=1e-6)
    assert len(rec["gsc"]) == len(names) + 2
    with pytest.raises(ValueError, match="'7x', which is not a submodule"):
        GradientFlow(model, gsc_data=(x, y), gsc_layers=["7x"])
