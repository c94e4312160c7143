"""The VGG study: gradient flow while VGG08 and VGG38 (with and without batch norm and residual
connections) train on CIFAR-100, after the University of Edinburgh MLP coursework (2021).

The networks (the coursework's ``ConvolutionalNetwork``, built by ``vgg``): an input convolution
3x3 (``--filters`` channels, padding 1) and leaky ReLU (slope 0.01); 3 stages, each of
``blocks_per_stage`` processing blocks (conv 3x3, leaky ReLU, conv 3x3, leaky ReLU) and one
dimensionality-reduction block (conv 3x3, leaky ReLU, average pool 2x2, conv 3x3, leaky ReLU);
global average pooling and ``Linear(filters, 100)``. VGG08 has no processing blocks
(1 + 3 x 2 + 1 = 8 weight layers), VGG38 five per stage (1 + 3 x (5 x 2 + 2) + 1 = 38).

- ``-BN``: every convolution is followed by batch norm (conv, BN, leaky ReLU), the input
  convolution's too.
- ``-RC``: every processing block becomes ``x + block(x)`` with both activations inside the
  branch and none after the sum, so the identity path from the output back to the input passes
  no activation (the clean shortcut of He et al. 2016, "Identity mappings"); the reduction
  blocks, which halve the resolution, keep no shortcut.
- Convolutions have no bias (the coursework's ``use_bias=False``); initialization is PyTorch's
  default (uniform, bound 1/sqrt(fan_in)) drawn from a private generator seeded by ``--seed``, the
  same for every variant, so VGG38, -BN, -RC and -BN-RC start from the same convolution weights.

Training (one runner job per variant): Adam (``--lr`` 1e-3, ``--weight-decay`` 0), the rate
annealed by a cosine over the epochs (``CosineAnnealingLR``, T_max = ``--epochs``, eta_min
``--eta-min`` 2e-5, stepped after each epoch), cross-entropy, minibatches of ``--batch-size`` 100
in a seeded order (the last incomplete one dropped), each image randomly cropped from the image
padded by 4 black pixels and randomly mirrored. Images are standardized per channel with the
statistics of the training part. Split: the last ``--val-size`` (2,500) images of the official
training set are the validation set; the official test set is evaluated once, at the end. The
data order and augmentation of an epoch are the same for every variant.

Measured per epoch: the training loss and accuracy (mean over the epoch's minibatches, as trained:
augmented, train mode), the validation loss and accuracy (eval mode), times. ``gscfast.GradientFlow``
records each weight's mean |gradient| and gradient norm at step 0, every ``--flow-every`` steps and
at the last step; ``flow-<variant>.png`` is the classic gradient-flow bar plot at the first and the
last step.

GSC: at initialization and at every recorded step, ``GSC(l, 0)`` (definitions.md) at every block
boundary (``block_boundaries``: the outputs of the input unit, of every processing and reduction
block; ``f_1`` the logits, ``f_0`` the cross-entropy) on a fixed set of ``--gsc-size`` (100)
training images (the first ones, not augmented), measured by ``GradientFlow(gsc_layers=...)``
through ``gscfast.gsc(layers=...)``: exact, one backward pass per chunk. Batch norm in train mode
is measured ``batchnorm="frozen"``: one datapoint per image, the set's batch statistics held
constant, comparable across variants (definitions.md). A record of a diverged run has no GSC
(``null``, with the reason).

Long runs: each job writes a checkpoint (model, optimizer, schedule, RNG state, history, gradient
flow records) atomically after every epoch to ``DIR/checkpoints/``; ``--resume`` continues from it
and ends with the same numbers as an uninterrupted run (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..estimators import explosion_rates
from ..flow import GradientFlow, plot_flow
from ..nn import Residual
from .outputs import (
    add_data_arguments,
    add_study_arguments,
    check_command,
    check_integers,
    check_number,
    check_numbers,
    config_from_args,
    config_section,
    figure_files,
    json_file,
    json_safe,
    pyplot,
    resolve_device,
    run_command,
    save_figure,
    text_file,
    usage_errors,
    write_files,
)
from .outputs import (
    fmt as _fmt,
)
from .outputs import (
    mean_or_none as _mean,
)
from .outputs import (
    num as _num,
)
from .outputs import (
    sci as _sci,
)
from .runner import Job, Study, job_seed
from .training import EpochLoop, deterministic, load_checkpoint, minibatches

__all__ = [
    "VARIANTS",
    "add_arguments",
    "aggregate",
    "block_boundaries",
    "check_result",
    "evaluate",
    "load_checkpoint",
    "load_data",
    "main",
    "make_config",
    "make_model",
    "make_study",
    "summary_md",
    "train_epoch",
    "train_variant",
    "vgg",
    "weight_layers",
    "write_outputs",
]

NAME = "vgg"
HELP = "gradient flow while VGG08/VGG38 (+BN, +RC) train on CIFAR-100 (MLP coursework 2021)"

# Variant -> (processing blocks per stage, batch norm, residual connections).
VARIANTS: dict[str, tuple[int, bool, bool]] = {
    "VGG08": (0, False, False),
    "VGG38": (5, False, False),
    "VGG38-BN": (5, True, False),
    "VGG38-RC": (5, False, True),
    "VGG38-BN-RC": (5, True, True),
}
CLASSES = 100
_EVAL_CHUNK = 500  # images per forward pass in evaluation (fixed: the sums' rounding depends on it)

# Test hooks (not part of the results): stop a job with KeyboardInterrupt after this many epochs
# computed in this process (a kill right after a checkpoint); per-epoch progress lines.
_INTERRUPT_AFTER: int | None = None
_PROGRESS = False


# ----------------------------------------------------------------------------- the networks
class GlobalAvgPool(nn.Module):
    """``[B, C, H, W] -> [B, C]``, the mean over positions (a plain mean: deterministic on GPUs,
    unlike ``AdaptiveAvgPool2d``'s backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def _unit(i: int, c_in: int, c_out: int, bn: bool, bias: bool) -> list[tuple[str, nn.Module]]:
    """conv 3x3 -> [BN] -> leaky ReLU, named ``conv<i>``, ``bn<i>``, ``act<i>``."""
    out: list[tuple[str, nn.Module]] = [
        (f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias))
    ]
    if bn:
        out.append((f"bn{i}", nn.BatchNorm2d(c_out)))
    return out + [(f"act{i}", nn.LeakyReLU(0.01))]


def vgg(
    blocks_per_stage: int,
    *,
    filters: int = 32,
    batch_norm: bool = False,
    residual: bool = False,
    stages: int = 3,
    in_channels: int = 3,
    num_classes: int = CLASSES,
    bias: bool = False,
    seed: int = 0,
) -> nn.Sequential:
    """The coursework's ``ConvolutionalNetwork`` as a plain ``nn.Sequential`` (see the module
    docstring): ``input``, ``stage<s>_block<b>`` (a ``gscfast.nn.Residual`` when ``residual``),
    ``stage<s>_reduce``, ``pool``, ``logits``. Weights are PyTorch's default initialization drawn
    from a private generator seeded with ``seed``; the global RNG is untouched."""
    check_integers(
        ("blocks_per_stage", blocks_per_stage, 0),
        ("filters", filters, 1),
        ("stages", stages, 0),
        ("in_channels", in_channels, 1),
        ("num_classes", num_classes, 1),
    )
    # Module constructors draw their default init from the global RNG: keep it as it was.
    with torch.random.fork_rng(devices=[]):
        layers: list[tuple[str, nn.Module]] = [
            ("input", nn.Sequential(OrderedDict(_unit(0, in_channels, filters, batch_norm, bias))))
        ]
        for s in range(stages):
            for b in range(blocks_per_stage):
                body = nn.Sequential(
                    OrderedDict(
                        _unit(0, filters, filters, batch_norm, bias)
                        + _unit(1, filters, filters, batch_norm, bias)
                    )
                )
                layers.append((f"stage{s}_block{b}", Residual(body) if residual else body))
            layers.append(
                (
                    f"stage{s}_reduce",
                    nn.Sequential(
                        OrderedDict(
                            _unit(0, filters, filters, batch_norm, bias)
                            + [("pool", nn.AvgPool2d(2))]
                            + _unit(1, filters, filters, batch_norm, bias)
                        )
                    ),
                )
            )
        layers += [("pool", GlobalAvgPool()), ("logits", nn.Linear(filters, num_classes))]
        model = nn.Sequential(OrderedDict(layers))
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = 1 / math.sqrt(
                    m.weight[0].numel()
                )  # kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in))
                m.weight.uniform_(-bound, bound, generator=gen)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=gen)
    return model


def make_model(variant: str, config: dict[str, Any]) -> nn.Sequential:
    """The network of ``variant`` (``VARIANTS``) with ``config``'s filters and seed."""
    blocks, bn, rc = VARIANTS[variant]
    return vgg(
        blocks,
        filters=config["filters"],
        batch_norm=bn,
        residual=rc,
        seed=job_seed(config["seed"], "init"),
    )


def block_boundaries(model: nn.Module) -> list[str]:
    """The layer boundaries of a ``vgg`` network for ``gscfast.gsc(layers=...)``: the top-level
    children before the global pooling (input unit, processing and reduction blocks), whose
    outputs ``f_L, ..., f_2`` end in an activation or a residual sum; the logits are ``f_1``."""
    names = [n for n, _ in model.named_children()]
    return names[: names.index("pool")]


def weight_layers(model: nn.Module) -> int:
    """The number of convolutions and linear layers (the "8" and "38" of VGG08 and VGG38)."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def _label(name: str) -> str:
    """A short tick label for a parameter name: ``stage1_block2.body.conv0.weight -> s1b2.conv0``."""
    name = name.removesuffix(".weight").replace(".body", "")
    return name.replace("stage", "s").replace("_block", "b").replace("_reduce", "r")


# ----------------------------------------------------------------------------- data
_DATA_CACHE: dict[tuple, dict[str, Any]] = {}


def load_data(config: dict[str, Any]) -> dict[str, Any]:
    """``{"train": (x, y), "val": ..., "test": ..., "fill": black pixel [3]}``: CIFAR-100 split and
    standardized by ``gscfast.data.cifar100_splits``, cut to ``max_train`` / ``max_test`` images
    (the first ones); cached per process."""
    key = (
        config["data_dir"],
        config["data_md5"],
        config["download"],
        config["val_size"],
        config["max_train"],
        config["max_test"],
    )
    if key not in _DATA_CACHE:
        from ..data import cifar100_splits

        s = cifar100_splits(
            config["data_dir"],
            val_size=config["val_size"],
            download=config["download"],
            md5=config["data_md5"],
        )

        def cut(xy, n):
            return xy if n is None else (xy[0][:n].clone(), xy[1][:n].clone())

        _DATA_CACHE.clear()
        _DATA_CACHE[key] = {
            "train": cut(s.train, config["max_train"]),
            "val": s.val,
            "test": cut(s.test, config["max_test"]),
            "fill": s.black,
        }
    return _DATA_CACHE[key]


# ----------------------------------------------------------------------------- training
def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    flow: GradientFlow | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    shuffle_seed: int,
    augment_seed: int,
    padding: int,
    fill: torch.Tensor,
) -> tuple[float, float]:
    """One epoch of augmented minibatch training (``flow.step()`` after each optimizer step);
    returns the mean loss and the accuracy over the epoch's minibatches, as trained."""
    from ..data.augment import augment

    model.train()
    gen = torch.Generator().manual_seed(int(augment_seed))
    loss_sum = torch.zeros(
        (), dtype=torch.float64, device=x.device
    )  # summed on the device: no sync
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    n = 0
    for idx in minibatches(len(x), batch_size, shuffle_seed, x.device):
        out = model(augment(x[idx], gen, padding=padding, fill=fill))
        loss = nn.functional.cross_entropy(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if flow is not None:
            flow.step()
        loss_sum += loss.detach().double() * len(idx)
        correct += (out.detach().argmax(1) == y[idx]).sum()
        n += len(idx)
    return float(loss_sum) / n, int(correct) / n


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[float | None, float | None]:
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode (batch norm with its running
    statistics) over ``(x, y)`` in fixed chunks; ``(None, None)`` for an empty set. The model's
    mode is restored."""
    if len(x) == 0:
        return None, None
    was = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    try:
        for i in range(0, len(x), _EVAL_CHUNK):
            out = model(x[i : i + _EVAL_CHUNK])
            loss += nn.functional.cross_entropy(
                out.double(), y[i : i + _EVAL_CHUNK], reduction="sum"
            )
            correct += (out.argmax(1) == y[i : i + _EVAL_CHUNK]).sum()
    finally:
        model.train(was)
    return float(loss) / len(x), int(correct) / len(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One job: train ``spec["variant"]`` for ``config["epochs"]`` epochs, checkpointing after
    every epoch to ``spec["checkpoint"]`` (resumed from it if present), then evaluate on the test
    set. A non-finite training loss stops the job with ``diverged: True`` (never raises)."""
    device = resolve_device(config["device"])
    data = load_data(config)
    (x, y), (xv, yv), (xt, yt) = (
        (a.to(device), b.to(device)) for a, b in (data["train"], data["val"], data["test"])
    )
    fill = data["fill"].to(device)
    variant, epochs = spec["variant"], config["epochs"]
    model = make_model(variant, config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=config["eta_min"])
    steps_per_epoch = len(x) // min(config["batch_size"], len(x))
    last_step = epochs * steps_per_epoch - 1
    stateful = {"model": model, "optimizer": opt, "scheduler": sched}
    loop = EpochLoop(
        spec.get("checkpoint"),
        stateful,
        epochs,
        {"history": [], "flow": {}, "gsc_init": {}},
        desc=variant,
        progress="lines" if _PROGRESS else None,
        interrupt_after=_INTERRUPT_AFTER,
    )
    history: list[dict[str, Any]] = loop.values["history"]
    flow_records: dict[str, Any] = loop.values["flow"]
    n_gsc = min(config["gsc_size"], len(x))  # the first images, fixed, not augmented
    layers = block_boundaries(model)
    flow = GradientFlow(
        model,
        every=config["flow_every"],
        steps={last_step},
        start=loop.epoch * steps_per_epoch,
        gsc_data=(x[:n_gsc], y[:n_gsc]) if n_gsc else None,
        gsc_layers=layers if n_gsc else None,
        error="kl",
        batchnorm="frozen",
    )

    def train(e: int) -> tuple[bool, str]:
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(
            model,
            opt,
            flow,
            x,
            y,
            batch_size=config["batch_size"],
            shuffle_seed=job_seed(config["seed"], "shuffle", e),
            augment_seed=job_seed(config["seed"], "augment", e),
            padding=config["padding"],
            fill=fill,
        )
        _sync(device)
        t1 = time.perf_counter()
        sched.step()
        h: dict[str, Any] = {
            "epoch": e,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
        }
        diverged = not math.isfinite(train_loss)
        if diverged:
            h["diverged"] = True
            h["val_loss"] = h["val_acc"] = None
        else:
            h["val_loss"], h["val_acc"] = evaluate(model, xv, yv)
        _sync(device)
        h["seconds"] = {"train": t1 - t0, "val": time.perf_counter() - t1}
        history.append(h)
        flow_records.update({str(k): v for k, v in flow.records.items()})
        return diverged, (
            f"train loss {_fmt(train_loss, 4)} acc {_fmt(train_acc, 4)}, val loss "
            f"{_fmt(h['val_loss'], 4)} acc {_fmt(h['val_acc'], 4)}, lr {lr:.3g}, "
            f"{h['seconds']['train']:.1f} s" + (" (diverged)" if diverged else "")
        )

    with deterministic(device), flow:
        if loop.epoch == 0:  # a resumed run has it in its checkpoint
            loop.values["gsc_init"] = flow.measure_gsc()
        loop.run(train)
    t0 = time.perf_counter()
    test_loss, test_acc = (None, None) if loop.diverged else evaluate(model, xt, yt)
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]  # what GradientFlow records
    return json_safe(
        {
            "variant": variant,
            "weight_layers": weight_layers(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs_done": loop.epoch,
            "diverged": loop.diverged,
            "history": history,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "test_seconds": time.perf_counter() - t0,
            "n_train": len(x),
            "n_val": len(xv),
            "n_test": len(xt),
            "steps_per_epoch": steps_per_epoch,
            "flow": {"every": config["flow_every"], "weights": names, "records": flow_records},
            "gsc": {
                "layers": layers if n_gsc else [],
                "n_images": n_gsc,
                "error": "kl",
                "batchnorm": "frozen",
                "init": loop.values["gsc_init"],
            },
            "device": str(device),
        }
    )


def check_result(config: dict, spec: dict, result: dict) -> None:
    """Raises ``ValueError`` unless ``result`` looks like ``train_variant``'s."""
    if not isinstance(result.get("history"), list) or not isinstance(result.get("diverged"), bool):
        raise ValueError("not a training result")
    if not result["diverged"] and len(result["history"]) != config["epochs"]:
        raise ValueError(f"expected {config['epochs']} epochs, got {len(result['history'])}")
    for k in (
        "epochs_done",
        "weight_layers",
        "parameters",
        "n_train",
        "n_val",
        "n_test",
        "steps_per_epoch",
    ):
        check_number(result.get(k), repr(k), integer=True)
    for k in ("test_loss", "test_acc"):  # null: diverged, or no test images
        check_number(result.get(k), repr(k), none=True)
    for i, h in enumerate(result["history"]):
        if not isinstance(h, dict) or not isinstance(h.get("seconds"), dict):
            raise ValueError(f"'history'[{i}] is not an epoch's record")
        check_number(h.get("epoch"), f"'history'[{i}]['epoch']", integer=True)
        check_number(h.get("lr"), f"'history'[{i}]['lr']")
        for k in (
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
        ):  # null: non-finite or no images
            check_number(h.get(k), f"'history'[{i}][{k!r}]", none=True)
        for k in ("train", "val"):
            check_number(h["seconds"].get(k), f"'history'[{i}]['seconds'][{k!r}]")
    flow = result.get("flow")
    if (
        not isinstance(flow, dict)
        or not isinstance(flow.get("records"), dict)
        or not flow["records"]
    ):
        raise ValueError("missing gradient-flow records")
    gsc = result.get("gsc")
    if not isinstance(gsc, dict) or not isinstance(gsc.get("layers"), list):
        raise ValueError("missing the GSC entry")
    check_number(gsc.get("n_images"), "'gsc'['n_images']", integer=True)
    measured = {"init": gsc.get("init")} | {
        f"record {s}": r for s, r in flow["records"].items() if isinstance(r, dict)
    }
    for where, rec in measured.items():
        if not isinstance(rec, dict):
            raise ValueError(f"the GSC at {where} is not a record")
        if not gsc["n_images"]:
            if "gsc" in rec:
                raise ValueError(f"a GSC at {where}, but no images to measure it on")
        elif rec.get("gsc") is None:  # refused (a diverged run): the reason instead
            if not isinstance(rec.get("gsc_error"), str):
                raise ValueError(f"no GSC at {where}, and no reason")
        else:  # GSC(l, 0) for l = 0..L: L - 1 named boundaries, the logits and the error
            check_numbers(rec["gsc"], f"the GSC at {where}", len(gsc["layers"]) + 2, none=True)
    for step, rec in flow["records"].items():
        weights = rec.get("weights") if isinstance(rec, dict) else None
        if not isinstance(weights, dict):
            raise ValueError(f"gradient-flow record {step} has no weights")
        for name, w in weights.items():
            for k in ("mean_abs", "norm"):  # null: a non-finite gradient
                check_number(
                    w.get(k) if isinstance(w, dict) else w,
                    f"gradient-flow record {step} {name}[{k!r}]",
                    none=True,
                )


# ----------------------------------------------------------------------------- the study
def make_config(
    *,
    archs: list[str] | None = None,
    epochs: int = 100,
    batch_size: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    eta_min: float = 2e-5,
    filters: int = 32,
    val_size: int = 2500,
    max_train: int | None = None,
    max_test: int | None = None,
    flow_every: int = 100,
    gsc_size: int = 100,
    padding: int = 4,
    data_dir: str = "data",
    data_md5: str | None = None,
    download: bool = False,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """The study's configuration (the coursework's scale by default), checked."""
    archs = list(archs or VARIANTS)
    if any(a not in VARIANTS for a in archs) or len(set(archs)) != len(archs) or not archs:
        raise ValueError(f"--archs must be distinct names among {', '.join(VARIANTS)}, got {archs}")
    if gsc_size == 1:  # a train-mode batch norm's statistics need two images
        raise ValueError("gsc_size must be 0 (no GSC) or at least 2, got 1")
    check_integers(
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 2),
        ("filters", filters, 1),
        ("val_size", val_size, 0),
        ("flow_every", flow_every, 1),
        ("gsc_size", gsc_size, 0),
        ("padding", padding, 0),
        ("max_train", max_train, 2),
        ("max_test", max_test, 1),
        optional=("max_train", "max_test"),
    )
    for k, number, pos in (
        ("lr", lr, True),
        ("weight_decay", weight_decay, False),
        ("eta_min", eta_min, False),
    ):
        if not (math.isfinite(number) and (number > 0 if pos else number >= 0)):
            raise ValueError(
                f"{k} must be a finite number {'> 0' if pos else '>= 0'}, got {number!r}"
            )
    return {
        "archs": archs,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "eta_min": float(eta_min),
        "filters": filters,
        "val_size": val_size,
        "max_train": max_train,
        "max_test": max_test,
        "flow_every": flow_every,
        "gsc_size": gsc_size,
        "padding": padding,
        "data_dir": str(data_dir),
        "data_md5": data_md5,
        "download": bool(download),
        "seed": int(seed),
        "device": device,
    }


def make_study(config: dict[str, Any], out: str | Path) -> Study:
    """One job per variant, keyed by its name; checkpoints in ``out/checkpoints/<variant>.pt``."""
    ck = (Path(out) / "checkpoints").resolve()
    jobs = [Job(v, {"variant": v, "checkpoint": str(ck / f"{v}.pt")}) for v in config["archs"]]
    return Study(NAME, config, jobs, train_variant, check_result, gpu=config["device"] != "cpu")


# ----------------------------------------------------------------------------- aggregation
def _ends(flow: dict[str, Any]) -> tuple[int, int]:
    steps = sorted(int(k) for k in flow["records"])
    return steps[0], steps[-1]


def flow_summary(result: dict[str, Any]) -> dict[str, Any]:
    """At the first and the last recorded step: the mean |gradient| of the first (input) and the
    last (output) weight, its median over all weight layers, and the ratio input / output."""
    import statistics

    flow = result["flow"]
    first, last = _ends(flow)
    names = flow["weights"]
    out: dict[str, Any] = {
        "first_step": first,
        "last_step": last,
        "input": names[0],
        "output": names[-1],
    }
    for tag, step in (("first", first), ("last", last)):
        w = flow["records"][str(step)]["weights"]
        # None: a non-finite gradient (a diverged run), stored as null in strict JSON
        a, b = w[names[0]]["mean_abs"], w[names[-1]]["mean_abs"]
        finite = [w[n]["mean_abs"] for n in names if n in w and w[n]["mean_abs"] is not None]
        out[tag] = {
            "input": a,
            "output": b,
            "ratio": a / b if a is not None and b else None,
            "median": statistics.median(finite) if finite else None,
        }
    return out


def aggregate(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number of the study but the gradient-flow records (those go to ``flow-<v>.json``)."""
    variants: dict[str, Any] = {}
    for v in config["archs"]:
        r = records[v]["result"]
        hist = r["history"]
        last = hist[-1] if hist else {}
        vals = [(h["val_acc"], h["epoch"]) for h in hist if h.get("val_acc") is not None]
        best = max(vals, key=lambda t: (t[0], -t[1])) if vals else (None, None)
        blocks, bn, rc = VARIANTS[v]
        variants[v] = {
            "blocks_per_stage": blocks,
            "batch_norm": bn,
            "residual": rc,
            **{
                k: r[k]
                for k in (
                    "weight_layers",
                    "parameters",
                    "epochs_done",
                    "diverged",
                    "test_loss",
                    "test_acc",
                    "n_train",
                    "n_val",
                    "n_test",
                    "steps_per_epoch",
                    "device",
                )
            },
            "final": {k: last.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
            "best_val_acc": best[0],
            "best_val_epoch": best[1],
            "seconds": {
                "train_per_epoch": _mean(h["seconds"]["train"] for h in hist),
                "val_per_epoch": _mean(h["seconds"]["val"] for h in hist),
                "train_total": sum(h["seconds"]["train"] for h in hist),
                "test": r["test_seconds"],
                "job_this_process": records[v]["seconds"],
            },
            "flow": flow_summary(r),
            "gsc": gsc_summary(r),
            "history": hist,
        }
    return {"study": NAME, "config": config, "variants": variants}


def _gsc_series(result: dict[str, Any]) -> list[tuple[int | None, dict[str, Any]]]:
    """``(step, record)`` of every GSC measurement in order: initialization (``None``), then
    every recorded step; empty where none was made (``--gsc-size 0``)."""
    if not result["gsc"]["n_images"]:
        return []
    recs = result["flow"]["records"]
    return [(None, result["gsc"]["init"])] + [
        (s, recs[str(s)]) for s in sorted(int(k) for k in recs)
    ]


def gsc_summary(result: dict[str, Any]) -> dict[str, Any]:
    """At initialization and at the last recorded step: the curve ``GSC(l, 0)`` (``l = 0..L``;
    null where refused, for a diverged run), ``GSC(L, 0)`` of the input unit's output, and the
    explosion rate fitted to the curve (``gscfast.explosion_rate``)."""
    g = result["gsc"]
    L = len(g["layers"]) + 1
    out: dict[str, Any] = {"L": L, "layers": g["layers"], "n_images": g["n_images"]}
    series = _gsc_series(result)
    for tag, (step, rec) in (("init", series[0]), ("last", series[-1])) if series else ():
        curve = rec.get("gsc")
        values = None if curve is None else [math.nan if v is None else v for v in curve]
        out[tag] = {
            "step": step,
            "gsc": curve,
            "input": None if values is None else values[L],
            "rate": None if values is None else float(explosion_rates(torch.tensor(values))),
            "error": rec.get("gsc_error"),
        }
    return out


# ----------------------------------------------------------------------------- outputs
def epochs_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "variant",
            "epoch",
            "lr",
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "t_train",
            "t_val",
        ]
    )
    for v, a in results["variants"].items():
        for h in a["history"]:
            w.writerow(
                [
                    v,
                    h["epoch"],
                    *(
                        _num(h.get(k))
                        for k in ("lr", "train_loss", "train_acc", "val_loss", "val_acc")
                    ),
                    _num(h["seconds"]["train"]),
                    _num(h["seconds"]["val"]),
                ]
            )
    return buf.getvalue()


def flow_csv(records: dict[str, dict[str, Any]], variants: list[str]) -> str:
    """Long table of every gradient-flow record: one row per (variant, step, weight)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "step", "epoch", "layer", "weight", "mean_abs", "norm"])
    for v in variants:
        r = records[v]["result"]
        flow, spe = r["flow"], r["steps_per_epoch"]
        for step in sorted(int(k) for k in flow["records"]):
            ws = flow["records"][str(step)]["weights"]
            for i, name in enumerate(flow["weights"], 1):
                if name in ws:
                    w.writerow(
                        [
                            v,
                            step,
                            step // spe + 1,
                            i,
                            name,
                            _num(ws[name]["mean_abs"]),
                            _num(ws[name]["norm"]),
                        ]
                    )
    return buf.getvalue()


def _boundary(layers: list[str], l: int) -> str:
    """The name of boundary ``f_l`` (paper numbering: ``f_0`` the error, ``f_1`` the logits)."""
    return {0: "error", 1: "logits"}.get(l) or layers[len(layers) + 1 - l]


def gsc_csv(records: dict[str, dict[str, Any]], variants: list[str]) -> str:
    """Long table of every GSC measurement: one row per (variant, step, boundary ``l``); step
    ``init`` (epoch 0) is before the first training step; an empty ``gsc`` is a refused
    (diverged) or undefined value."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "step", "epoch", "l", "boundary", "gsc"])
    for v in variants:
        r = records[v]["result"]
        layers, spe = r["gsc"]["layers"], r["steps_per_epoch"]
        for step, rec in _gsc_series(r):
            curve = rec.get("gsc") or [None] * (len(layers) + 2)
            for l, value in enumerate(curve):
                w.writerow(
                    [
                        v,
                        "init" if step is None else step,
                        0 if step is None else step // spe + 1,
                        l,
                        _boundary(layers, l),
                        _num(value),
                    ]
                )
    return buf.getvalue()


def plot_gsc(records: dict[str, dict[str, Any]], variants: list[str], paths: list[Path]) -> None:
    """GSC(l, 0) against ``l`` at initialization and at the last step, and GSC(L, 0) (the input
    unit's output) over training, one color per variant, log scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = plt.get_cmap("tab10").colors

    def nan(v: float | None) -> float:
        return math.nan if v is None else v

    for i, v in enumerate(variants):
        r = records[v]["result"]
        series = _gsc_series(r)
        if not series:
            continue
        L = len(r["gsc"]["layers"]) + 1
        for ax, (step, rec) in zip(axes[:2], (series[0], series[-1])):
            curve = rec.get("gsc") or [None] * (L + 1)
            ax.plot(
                range(L + 1),
                [nan(c) for c in curve],
                "o-",
                color=colors[i % 10],
                markersize=3,
                label=v if step is None else f"{v} (step {step})",
            )
        steps = [0 if s is None else s + 1 for s, _ in series]  # init at 0, step s after it
        ys = [nan((rec.get("gsc") or [None] * (L + 1))[L]) for _, rec in series]
        axes[2].plot(steps, ys, "o-", color=colors[i % 10], markersize=3, label=f"{v} (L = {L})")
    for ax, t in zip(axes, ("at initialization", "at the last step", "GSC(L, 0) during training")):
        ax.set_yscale("log")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xlabel("l (block boundary, 0 = error, 1 = logits, L = input unit)")
        ax.set_ylabel("GSC(l, 0)")
    axes[2].set_xlabel("optimizer steps taken (0 = initialization)")
    axes[2].set_ylabel("GSC(L, 0)")
    cfg = next(iter(records.values()))["result"]["gsc"]
    fig.suptitle(
        f"gradient scale coefficient at the block boundaries, on {cfg['n_images']} training "
        "images (cross-entropy, batch norm frozen)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, paths)


def plot_curves(results: dict[str, Any], paths: list[Path]) -> None:
    """Loss and accuracy per epoch: one color per variant, solid training, dashed validation."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.get_cmap("tab10").colors
    for i, (v, a) in enumerate(results["variants"].items()):
        ep = [h["epoch"] for h in a["history"]]
        for ax, q in zip(axes, ("loss", "acc")):
            for split, style in (("train", "-"), ("val", "--")):
                ys = [h.get(f"{split}_{q}") for h in a["history"]]
                ax.plot(
                    ep,
                    [math.nan if t is None else t for t in ys],
                    style,
                    color=colors[i % 10],
                    marker="o" if len(ep) < 15 else None,
                    markersize=3,
                    label=f"{v} {'training' if split == 'train' else 'validation'}",
                )
    for ax, t in zip(axes, ("cross-entropy loss", "accuracy")):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    cfg = results["config"]
    fig.suptitle(
        f"CIFAR-100, {cfg['filters']} filters, Adam lr {cfg['lr']:g} (cosine), batch "
        f"{cfg['batch_size']} (solid: training, dashed: validation)",
        fontsize=10,
    )
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=min(len(lab), 4), fontsize=8, frameon=False)
    rows = math.ceil(len(lab) / 4)
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    save_figure(fig, paths)


def plot_flow_variant(v: str, result: dict[str, Any], paths: list[Path]) -> None:
    """The classic gradient-flow bar plot of one variant at its first and last recorded step."""
    flow, spe = result["flow"], result["steps_per_epoch"]
    steps = sorted(set(_ends(flow)))
    titles = [
        f"step {s} (epoch {s // spe + 1}, {'first' if s == steps[0] else 'last'} step)"
        for s in steps
    ]
    pyplot()  # the Agg backend before the figure is made
    fig = plot_flow(
        flow["records"],
        steps,
        titles=titles,
        labels={n: _label(n) for n in flow["weights"]},
        suptitle=f"{v}: gradient flow per weight layer, input to output",
    )
    save_figure(fig, paths)


def plot_flow_comparison(
    records: dict[str, dict[str, Any]], variants: list[str], paths: list[Path]
) -> None:
    """Mean |gradient| per weight layer (input to output) of every variant, first and last step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    colors = plt.get_cmap("tab10").colors
    for i, v in enumerate(variants):
        flow = records[v]["result"]["flow"]
        for ax, step in zip(axes, _ends(flow)):
            ws = flow["records"][str(step)]["weights"]
            ys = [
                math.nan if ws.get(n, {}).get("mean_abs") is None else ws[n]["mean_abs"]
                for n in flow["weights"]
            ]
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                "o-",
                color=colors[i % 10],
                markersize=3,
                label=f"{v} (step {step})",
            )
    for ax, t in zip(axes, ("first step of training", "last step of training")):
        ax.set_yscale("log")
        ax.set_title(t)
        ax.set_xlabel("weight layer (1 = input convolution, last = output layer)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean |gradient|")
    fig.tight_layout()
    save_figure(fig, paths)


def _gsc_section(results: dict[str, Any]) -> list[str]:
    """The summary's GSC table, and how it relates to the coursework's finding (computed)."""
    vs = results["variants"]
    n = next(iter(vs.values()))["gsc"]["n_images"]
    lines = ["## Gradient scale coefficient", ""]
    if not n:
        return lines + ["Not measured (`--gsc-size 0`)."]
    lines += [
        f"`GSC(l, 0)` (definitions.md) at every block boundary on the first {n} training images "
        "(not augmented), at initialization and at every recorded step (`gsc.png`, `gsc.csv`): "
        "`f_L` is the input unit's output, `f_2` the last reduction block's, `f_1` the logits, "
        "`f_0` the cross-entropy. `GSC(L, 0)` is the relative gradient at the input unit against "
        "that at the error: below 1, relative gradients shrink toward the input; the rate is "
        "the factor per boundary of a least-squares fit of `log GSC(l, 0)` against `l`.",
        "",
        "| variant | L | GSC(L, 0) at init | rate at init | last step | GSC(L, 0) there "
        "| rate there |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, a in vs.items():
        g = a["gsc"]
        i, e = g["init"], g["last"]
        lines.append(
            f"| {v} | {g['L']} | {_sci(i['input'])} | {_fmt(i['rate'], 3)} | {e['step']} "
            f"| {_sci(e['input'])} | {_fmt(e['rate'], 3)} |"
        )
    refused = [v for v, a in vs.items() if a["gsc"]["last"]["error"]]
    if refused:
        lines += ["", f"No GSC at the last step of {', '.join(refused)}: values not finite."]
    lines += ["", "### Against the coursework's finding", ""]
    base = vs.get("VGG38")
    fixes = [v for v in ("VGG38-BN", "VGG38-RC", "VGG38-BN-RC") if v in vs]
    if base is None or not fixes or base["gsc"]["init"]["input"] is None:
        return lines + [
            "VGG38 and a variant with batch norm or residual connections were not both "
            "measured: no comparison."
        ]
    b = base["gsc"]["init"]["input"]
    lines.append(
        "The coursework found that VGG38's gradients vanish (its first layers' mean |gradient| "
        "far below the output layer's) and that batch norm and residual connections fix it. At "
        f"initialization, VGG38's `GSC(L, 0)` is {_sci(b)}; its mean |gradient| input / output "
        f"is {_sci(base['flow']['first']['ratio'])} at the first step."
    )
    lines.append("")
    above = []
    for v in fixes:
        o = vs[v]["gsc"]["init"]["input"]
        if o is not None:
            above.append(o > b)
            lines.append(
                f"- {v}: `GSC(L, 0)` {_sci(o)} ({_sci(o / b) if b else 'n/a'} x VGG38's); mean "
                f"|gradient| input / output {_sci(vs[v]['flow']['first']['ratio'])}."
            )
    agree = b < 1 and above and all(above)
    lines += [
        "",
        (
            "The GSC agrees: VGG38's relative gradient shrinks toward the input, and every "
            "variant with batch norm or residual connections measured here shrinks it less."
            if agree
            else "The GSC does not show the same ordering here: VGG38's `GSC(L, 0)` is not both "
            "below 1 and below every variant with batch norm or residual connections measured."
        ),
    ]
    return lines


def summary_md(results: dict[str, Any], info: dict[str, Any], files: list[str]) -> str:
    cfg = results["config"]
    vs = results["variants"]
    any_v = next(iter(vs.values()))
    lines = [
        "# VGG study: gradient flow in VGG08 / VGG38 on CIFAR-100 (MLP coursework 2021)",
        "",
        f"gscfast {info['version']}: {len(vs)} variants, {cfg['epochs']} epochs of Adam (lr "
        f"{cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, cosine annealing to {cfg['eta_min']:g}), "
        f"batch {cfg['batch_size']}, {cfg['filters']} filters; {any_v['n_train']:,} training, "
        f"{any_v['n_val']:,} validation, {any_v['n_test']:,} test images; seed {cfg['seed']}.",
        "",
        "## Results (after the last epoch)",
        "",
        "| variant | weight layers | parameters | epochs | train loss | train acc | val loss "
        "| val acc | best val acc (epoch) | test loss | test acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, a in vs.items():
        f = a["final"]
        ep = f"{a['epochs_done']}" + (" (diverged)" if a["diverged"] else "")
        best = (
            f"{_fmt(a['best_val_acc'], 4)} ({a['best_val_epoch']})"
            if a["best_val_acc"] is not None
            else "n/a"
        )
        lines.append(
            f"| {v} | {a['weight_layers']} | {a['parameters']:,} | {ep} | {_fmt(f['train_loss'], 4)} "
            f"| {_fmt(f['train_acc'], 4)} | {_fmt(f['val_loss'], 4)} | {_fmt(f['val_acc'], 4)} "
            f"| {best} | {_fmt(a['test_loss'], 4)} | {_fmt(a['test_acc'], 4)} |"
        )
    lines += [
        "",
        "## Gradient flow",
        "",
        "Mean |gradient| of the weight of the input convolution, its median over all weight "
        "layers, that of the output layer, and the ratio input / output, at the first and the "
        "last step of training (`flow-<variant>.png` shows every layer).",
        "",
        "| variant | step (epoch) | input layer | median layer | output layer | input / output |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v, a in vs.items():
        fl = a["flow"]
        for t in ("first", "last"):
            step = fl[f"{t}_step"]
            lines.append(
                f"| {v} | {step} ({step // a['steps_per_epoch'] + 1}) | {_sci(fl[t]['input'])} "
                f"| {_sci(fl[t]['median'])} | {_sci(fl[t]['output'])} | {_sci(fl[t]['ratio'])} |"
            )
    lines += ["", *_gsc_section(results)]
    lines += [
        "",
        "## Timings",
        "",
        "| variant | training s / epoch | validation s / epoch | training total s | test s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v, a in vs.items():
        s = a["seconds"]
        lines.append(
            f"| {v} | {_fmt(s['train_per_epoch'], 2)} | {_fmt(s['val_per_epoch'], 2)} "
            f"| {_fmt(s['train_total'], 1)} | {_fmt(s['test'], 2)} |"
        )
    devices = sorted({a["device"] for a in vs.values()})
    lines += [
        "",
        f"Machine: {info['machine']}; device {', '.join(devices)}; engine {info['engine']}, "
        f"{info['threads']} CPU threads per job.",
        "",
        "## How the numbers are made",
        "",
        "- **train loss / acc**: mean cross-entropy and accuracy over the epoch's minibatches as "
        "they were trained on (augmented, train mode, weights changing during the epoch).",
        "- **val / test**: eval mode (batch norm with running statistics), no augmentation, over "
        f"the held-out last {cfg['val_size']:,} images of the official training set / the official "
        "test set (evaluated once, after the last epoch).",
        "- **gradient flow**: `gscfast.GradientFlow` reads each weight's gradient right after "
        f"backward at step 0, every {cfg['flow_every']} steps and at the last step; mean |gradient| "
        "and the Frobenius norm per weight (convolutions and the output layer; biases and "
        "batch-norm parameters are not shown).",
        "- **data**: CIFAR-100 fine labels, standardized per channel with the training part's "
        f"statistics; random crop (padding {cfg['padding']}, black) and horizontal flip, the same "
        "data order and augmentation for every variant; initial weights seeded so that VGG38 and "
        "its -BN, -RC, -BN-RC variants start from the same convolution weights.",
        "- **resume**: per-epoch checkpoints; a resumed run repeats an uninterrupted one bit for "
        "bit on the same machine and thread count.",
        "",
        *config_section(cfg),
        "## Files",
        "",
        *(f"- {f}" for f in files),
        "- `manifest.json`, `jobs/`, `checkpoints/`: the run (one record and one checkpoint per "
        "variant); rerun the same command with `--resume` to continue or to regenerate these files.",
        "",
    ]
    return "\n".join(lines)


_FILE_NOTES = {
    "results.json": "every number: per variant the per-epoch history, final, best and test metrics, "
    "gradient-flow summary, timings; the configuration",
    "epochs.csv": "one row per variant and epoch (learning rate, losses, accuracies, seconds)",
    "flow.csv": "every gradient-flow record: variant, step, epoch, layer (1 = input), weight, "
    "mean_abs, norm",
    "curves.png": "training and validation loss and accuracy per epoch (also `curves.pdf`)",
    "flow-comparison.png": "mean |gradient| per layer of every variant at the first and last step "
    "(also `.pdf`)",
    "gsc.csv": "every GSC measurement: variant, step (`init`: before training), epoch, l, "
    "boundary (module name), GSC(l, 0)",
    "gsc.png": "GSC(l, 0) at the block boundaries at initialization and at the last step, and "
    "GSC(L, 0) during training, every variant (also `.pdf`)",
    "summary.md": "this file",
}


def write_outputs(out: str | Path, config: dict[str, Any], result) -> dict[str, Path]:
    """Every output file from a complete run's records."""
    results = aggregate(config, result.records)
    files = [
        text_file("epochs.csv", epochs_csv(results)),
        text_file("flow.csv", flow_csv(result.records, config["archs"])),
        figure_files("curves", lambda paths: plot_curves(results, paths)),
        figure_files(
            "flow-comparison",
            lambda paths: plot_flow_comparison(result.records, config["archs"], paths),
        ),
    ]
    if config["gsc_size"]:
        files += [
            text_file("gsc.csv", gsc_csv(result.records, config["archs"])),
            figure_files("gsc", lambda paths: plot_gsc(result.records, config["archs"], paths)),
        ]
    notes = {k: n for k, n in _FILE_NOTES.items() if config["gsc_size"] or "gsc" not in k}
    for v in config["archs"]:
        r = result.records[v]["result"]
        files += [
            json_file(
                f"flow-{v}.json",
                {"variant": v, "steps_per_epoch": r["steps_per_epoch"], **r["flow"]},
            ),
            figure_files(f"flow-{v}", functools.partial(plot_flow_variant, v, r)),
        ]
        notes[f"flow-{v}.png"] = (
            f"gradient-flow bar plot of {v} at the first and last step (also "
            f"`.pdf`); `flow-{v}.json`: its GradientFlow records"
        )
    listed = [f"`{k}`: {notes[k]}" for k in notes]
    return write_files(
        out, result, results, files, lambda results, info: summary_md(results, info, listed)
    )


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--archs",
        nargs="+",
        default=list(VARIANTS),
        metavar="VARIANT",
        help=f"variants among {', '.join(VARIANTS)} (default: all five)",
    )
    p.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    p.add_argument("--batch-size", type=int, default=100, help="minibatch size (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="Adam's weight decay (default 0)"
    )
    p.add_argument(
        "--eta-min",
        type=float,
        default=2e-5,
        help="the cosine schedule's final learning rate (default 2e-5)",
    )
    p.add_argument(
        "--filters", type=int, default=32, help="channels of every convolution (default 32)"
    )
    p.add_argument(
        "--val-size",
        type=int,
        default=2500,
        help="validation images held out from the end of the official training set (default 2500)",
    )
    p.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="train on the first N training images only (quick runs; default: all)",
    )
    p.add_argument(
        "--max-test",
        type=int,
        default=None,
        help="evaluate on the first N test images only (quick runs; default: all)",
    )
    p.add_argument(
        "--flow-every",
        type=int,
        default=100,
        help="record the gradient flow every N steps (and at the first and last; default 100)",
    )
    p.add_argument(
        "--gsc-size",
        type=int,
        default=100,
        help="measure GSC(l, 0) at every block boundary on the first N training images at "
        "initialization and at every recorded step (0: not at all; default 100)",
    )
    add_data_arguments(p, "cifar-100-python.tar.gz or cifar-100-binary.tar.gz")
    add_study_arguments(p, NAME, dtype=None, backend=None)


def main(args: argparse.Namespace) -> int:
    global _PROGRESS
    config = config_from_args(make_config, args)

    def write(result) -> dict[str, Path]:
        paths = write_outputs(args.out, config, result)
        if not args.quiet:
            res = json.loads(paths["results.json"].read_text())
            print(
                f"{'variant':<12} {'layers':>6} {'train acc':>9} {'val acc':>8} {'test acc':>8} "
                f"{'grad ratio in/out (first step)':>31} {'GSC(L, 0) at init':>17}"
            )
            for v, a in res["variants"].items():
                print(
                    f"{v:<12} {a['weight_layers']:>6} {_fmt(a['final']['train_acc'], 4):>9} "
                    f"{_fmt(a['final']['val_acc'], 4):>8} {_fmt(a['test_acc'], 4):>8} "
                    f"{_sci(a['flow']['first']['ratio']):>31} "
                    f"{_sci(a['gsc'].get('init', {}).get('input')):>17}"
                )
        return paths

    check_command(args)  # before the data are loaded
    if args.engine == "local":  # a missing or wrong archive is a usage error, not a traceback
        with usage_errors(OSError, ValueError):
            load_data(config)  # cached: the jobs of this process reuse it
    _PROGRESS = not args.quiet
    try:
        return run_command(make_study(config, args.out), args, write)
    finally:
        _PROGRESS = False
