"""The CIFAR-10 study: Figure 3 of Philipp, Song & Carbonell (2018) at the paper's scale.

The four exploding architectures of the Gaussian study (batch-ReLU, layer-tanh, batch-tanh, SeLU):
51 linear layers (50 of width 100, then the output layer to 10 classes), softmax and the KL error
layer (cross-entropy). Two phases, each a study of ``gscfast.experiments.runner``:

1. **Learning-rate search** (``DIR/search``): one job per (architecture, rate) trains
   ``--search-epochs`` epochs (default: ``--epochs``) and records its final training error, or
   ``diverged`` when the loss or a weight becomes non-finite (the job stops there; the search goes on).
   The rate with the lowest final training error is kept (ties: lower loss, then larger rate).
2. **Final training** (``DIR/final``): one job per architecture trains ``--epochs`` epochs with its
   chosen rate and, after every epoch, over the whole training set: the training error (KL loss and
   classification error), the expected GSC(l, 0) for every l (so GSC(L, 0) too), the
   pre-activation statistics, the operator (spectral) norm of ``W_t - W_0`` per layer, and the
   effective depth with its contribution profile: exactly on a fixed seeded subset
   (``--ed-samples``) every epoch, over the whole set every ``--ed-every`` epochs, in float64 (the
   networks train in float32; ``_effective_depth``). After training, the
   compositional-depth-reduction (Taylor) curve of definitions.md.

Choices the paper leaves open (all options): plain SGD (no momentum, no weight decay) with
minibatches of 100 (``--batch-size``), reshuffled every epoch by a seeded generator, the last
incomplete minibatch dropped; the learning rate is multiplied by 1/3 whenever the training
classification error over the whole training set has not reached a new minimum for 5 epochs
(``--patience``, ``--factor``); the schedule counter restarts after each decrease.

Batch norm: the networks train in train mode (batch statistics of each minibatch). Every
whole-training-set measurement uses train-mode batch norm with the batch statistics of the whole
measured set. How its datapoints are formed is ``--bn-datapoint`` (``bn_datapoint``):

- ``frozen`` (default; definitions.md's **(choice)**): the measured set's batch statistics are held
  constant (``batchnorm="frozen"``), so every image is one datapoint. The KL error is positive, so
  with the whole set as one datapoint ``f_0 = sum_i e_i`` grows like the set size B while the
  Jacobian's norm does not: GSC(l, 0) would scale like 1/B and depend on how many images are
  measured (about 1/50,000 of its per-sample value on CIFAR-10), not comparable across set sizes or
  with the architectures without batch norm.
- ``batch``: the coupled form, the whole measured set is **one datapoint** (definitions.md).

The mode applies to the GSC, the pre-activation statistics (the same forward values in both modes)
and the effective depth, over the whole set and on the ``--ed-samples`` subset; the subset is a
measured set of its own (its own batch statistics, frozen or coupled), as it always was. The Taylor
curve is a per-sample expansion, which the coupled function has none of: with ``frozen`` it expands
the function every other measurement sees (batch norm frozen at the whole training set's
statistics, so its K = 0 is the reported training error); with ``batch`` it evaluates the model in
eval mode (running statistics), as ``gscfast.taylor.taylor_curve`` does. The eval-mode error
(``eval_error``) is reported in both modes.

Long runs: every training job writes a checkpoint (model, initial model, optimizer, schedule, RNG
state, metrics so far) atomically after every epoch to ``DIR/<phase>/checkpoints/``; ``--resume``
continues from the last one and ends with the same numbers as an uninterrupted run (shuffling is
seeded per epoch). Checkpoints hold only tensors and plain values and load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .outputs import (
    PhaseRunner,
    add_data_arguments,
    add_study_arguments,
    check_integers,
    check_number,
    check_numbers,
    config_from_args,
    config_section,
    figure_files,
    pyplot,
    run_phases,
    save_figure,
    text_file,
    write_files,
)
from .outputs import (
    json_safe as _json_safe,
)
from .outputs import (
    mean_or_none as _mean,
)
from .outputs import (
    num as _num,
)
from .outputs import (
    resolve_device as _device,
)
from .runner import Job, Study, UsageError, job_seed
from .training import EpochLoop, load_checkpoint, minibatches

__all__ = [
    "ARCHS",
    "BN_DATAPOINTS",
    "PAPER_ARCHS",
    "PAPER_LRS",
    "PlateauSchedule",
    "add_arguments",
    "aggregate",
    "choose_lrs",
    "datapoint",
    "load_checkpoint",
    "load_data",
    "main",
    "make_config",
    "make_final_study",
    "make_model",
    "make_search_study",
    "train_job",
    "write_outputs",
]

NAME = "cifar"
HELP = "Figure 3 of Philipp et al. (2018): training on CIFAR-10, GSC, effective depth, Taylor test"

# The four exploding architectures of the Gaussian study: name -> (activation, norm).
ARCHS: dict[str, tuple[str, str | None]] = {
    "batch-ReLU": ("relu", "batch"),
    "layer-tanh": ("tanh", "layer"),
    "batch-tanh": ("tanh", "batch"),
    "SeLU": ("selu", None),
}
PAPER_ARCHS = list(ARCHS)
# {1e5, 3e4, 1e4, 3e3, ..., 1e-4, 3e-5, 1e-5}
PAPER_LRS = sorted(
    {float(f"{m}e{e}") for e in range(-5, 6) for m in (1, 3) if float(f"{m}e{e}") <= 1e5},
    reverse=True,
)
DATASETS = ("cifar10", "digits")
# How a batch-norm network's datapoints are formed when it is measured (module docstring).
BN_DATAPOINTS = ("frozen", "batch")

# Test hooks (not part of the results): stop a training job with KeyboardInterrupt after this many
# epochs computed in this process (simulates a kill after a checkpoint); per-epoch progress bars.
_INTERRUPT_AFTER: int | None = None
_PROGRESS = False


# ----------------------------------------------------------------------------- data and models
_DATA_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def load_data(config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set ``(x [N, n], y [N])`` of ``config["dataset"]`` (cached per process)."""
    key = (config["dataset"], config["data_dir"], config["data_md5"], config["download"])
    if key not in _DATA_CACHE:
        if config["dataset"] == "cifar10":
            from ..data import cifar10

            x, y = cifar10(
                config["data_dir"], train=True, download=config["download"], md5=config["data_md5"]
            )
        else:
            from ..data import digits

            x, y = digits(train=True)
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (x.contiguous(), y.contiguous())
    return _DATA_CACHE[key]


def make_model(arch: str, config: dict[str, Any], in_features: int) -> nn.Sequential:
    """``gscfast.mlp(depth, width, act, norm, in_features, out_features=10)``, seeded per architecture
    (the same initial weights for every learning rate and for the final run)."""
    from .. import mlp

    act, norm = ARCHS[arch]
    return mlp(
        config["depth"],
        config["width"],
        act=act,
        norm=norm,
        in_features=in_features,
        out_features=10,
        seed=job_seed(config["seed"], "net", arch),
    )


class PlateauSchedule:
    """Multiply the learning rate by ``factor`` whenever the monitored training error has not
    reached a new minimum (strictly lower) for ``patience`` epochs; the count restarts then."""

    def __init__(self, lr: float, patience: int = 5, factor: float = 1 / 3) -> None:
        self.lr, self.patience, self.factor = float(lr), int(patience), float(factor)
        self.best, self.bad = math.inf, 0

    def step(self, error: float) -> float:
        if error < self.best:
            self.best, self.bad = float(error), 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                self.lr *= self.factor
                self.bad = 0
        return self.lr

    def state_dict(self) -> dict[str, float]:
        return {
            "lr": self.lr,
            "patience": self.patience,
            "factor": self.factor,
            "best": self.best,
            "bad": self.bad,
        }

    def load_state_dict(self, s: dict[str, float]) -> None:
        self.lr, self.patience, self.factor = float(s["lr"]), int(s["patience"]), float(s["factor"])
        self.best, self.bad = float(s["best"]), int(s["bad"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    train_mode: bool = True,
    chunk: int = 10_000,
) -> tuple[float, float]:
    """``(mean KL loss, classification error)`` over ``(x, y)``. ``train_mode``: batch norm with the
    statistics of the whole set (one forward pass, on a copy so that running statistics are not
    touched); else eval mode in chunks."""
    m = copy.deepcopy(model).train(train_mode)
    has_bn = any(isinstance(t, nn.modules.batchnorm._BatchNorm) for t in m.modules())
    if train_mode and has_bn:
        out = m(x)
    else:
        out = torch.cat([m(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    loss = nn.functional.cross_entropy(out.double(), y, reduction="mean")
    return float(loss), float((out.argmax(1) != y).double().mean())


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
) -> bool:
    """One epoch of minibatch training in a seeded order; False if the loss became non-finite."""
    model.train()
    for idx in minibatches(len(x), batch_size, seed, x.device):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _finite(model)


# ----------------------------------------------------------------------------- one job
def _measure(
    config: dict,
    model: nn.Module,
    init: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sub: torch.Tensor,
    epoch: int,
    epochs: int,
) -> dict[str, Any]:
    from .. import analyze
    from ..taylor import weight_change_norms

    # Every gscfast measurement takes the same datapoint form (module docstring); it changes
    # nothing for the architectures without batch norm.
    bn = config["bn_datapoint"]
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    loss, err = evaluate(model, x, y)
    t["error"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # One call over the whole set: the expected GSC is the ratio of expectations over all its
    # datapoints (definitions.md), never a mean of per-datapoint or per-chunk ratios.
    a = analyze(model, x, y, error="kl", batchnorm=bn, backend=config["backend"])
    t["gsc"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    norms = weight_change_norms(model, init)
    t["opnorm"] = time.perf_counter() - t0
    m: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": loss,
        "train_error": err,
        "gsc": a.gsc.tolist(),
        "preact_std": a.preact_std.tolist(),
        "sign_diversity": a.sign_diversity.tolist(),
        "opnorm": norms.tolist(),
    }
    if config["ed_samples"] > 0:
        t0 = time.perf_counter()
        d, prof = _effective_depth(config, model, init, x[sub], y[sub])
        t["ed_subset"] = time.perf_counter() - t0
        m["ed_subset"], m["profile_subset"] = d, prof[-1].tolist()
        if epoch == epochs:  # the whole [L+1, L+1] profile once, at the end
            m["profile_subset_matrix"] = prof.tolist()
    every = config["ed_every"]
    if every > 0 and (epoch % every == 0 or epoch == epochs):
        t0 = time.perf_counter()
        d, prof = _effective_depth(config, model, init, x, y)
        t["ed_full"] = time.perf_counter() - t0
        m["ed_full"], m["profile_full"] = d, prof[-1].tolist()
    m["seconds"] = t
    return m


def _effective_depth(
    config: dict, model: nn.Module, init: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """``gscfast.effective_depth`` of float64 copies of the models on ``x`` in float64. The order-
    lambda contributions fall like the weights' relative change to the power ``2 lambda``: after
    an epoch the high orders of a 50-layer network are below 1e-40, which float32 cannot hold, and
    gscfast refuses such float32 results (``NumericalError``), so the study stopped there."""
    from .. import effective_depth

    return effective_depth(
        copy.deepcopy(model).double(),
        copy.deepcopy(init).double(),
        x.double(),
        y,
        error="kl",
        tau=config["tau"],
        batchnorm=config["bn_datapoint"],
        backend=config["backend"],
    )


def _taylor_model(config: dict, model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The model whose Taylor curve is reported (``taylor_curve`` evaluates it in eval mode): with
    ``bn_datapoint="frozen"`` a copy whose batch norms hold the whole set's batch statistics, the
    function every other measurement sees; with ``"batch"`` the model itself (running statistics)."""
    if config["bn_datapoint"] != "frozen":
        return model
    from ..nn import freeze_batchnorm

    return freeze_batchnorm(model, x)


def train_job(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One training run: ``spec`` has ``arch``, ``lr``, ``epochs``, ``measure`` (the final phase's
    per-epoch measurements and Taylor curve) and ``checkpoint`` (file path, or None). Resumes from
    the checkpoint if there is one. Never raises on divergence: returns ``diverged: True``."""
    device = _device(config["device"])
    x, y = load_data(config)
    x, y = x.to(device), y.to(device)
    arch, epochs, measure = spec["arch"], spec["epochs"], spec["measure"]
    model = make_model(arch, config, x.shape[1]).to(device)
    init = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=config["momentum"])
    sched = PlateauSchedule(spec["lr"], config["patience"], config["factor"])
    gen = torch.Generator().manual_seed(job_seed(config["seed"], "ed-subset"))
    n_sub = min(config["ed_samples"], len(x))
    sub = torch.randperm(len(x), generator=gen)[:n_sub].sort().values.to(device)
    stateful = {"model": model, "init": init, "optimizer": opt, "schedule": sched}
    loop = EpochLoop(
        spec.get("checkpoint"),
        stateful,
        epochs,
        {"history": [], "lrs": []},
        desc=f"{arch} lr={spec['lr']:g}",
        progress="bar" if _PROGRESS else None,
        interrupt_after=_INTERRUPT_AFTER,
    )
    history: list[dict[str, Any]] = loop.values["history"]
    lrs: list[float] = loop.values["lrs"]
    if measure and not history:
        history.append(_measure(config, model, init, x, y, sub, 0, epochs))

    def train(e: int) -> tuple[bool, str]:
        for g in opt.param_groups:
            g["lr"] = sched.lr
        t0 = time.perf_counter()
        ok = train_epoch(
            model, opt, x, y, config["batch_size"], job_seed(config["seed"], "shuffle", arch, e)
        )
        train_s = time.perf_counter() - t0
        lrs.append(sched.lr)
        if not ok:
            history.append({"epoch": e, "diverged": True})
            return True, "diverged"
        if measure:
            m = _measure(config, model, init, x, y, sub, e, epochs)
        else:
            t1 = time.perf_counter()
            loss, err = evaluate(model, x, y)
            m = {
                "epoch": e,
                "train_loss": loss,
                "train_error": err,
                "seconds": {"error": time.perf_counter() - t1},
            }
        m["seconds"]["train"] = train_s
        m["lr"] = lrs[-1]
        diverged = not (math.isfinite(m["train_loss"]) and math.isfinite(m["train_error"]))
        if diverged:
            m["diverged"] = True
        else:
            sched.step(m["train_error"])
        history.append(m)
        text = "diverged" if diverged else f"err={m['train_error']:.4f}"
        if measure and "gsc" in m:
            text += f" GSC(L,0)={m['gsc'][-1]:.3g}"
        return diverged, text

    loop.run(train)
    last = next((h for h in reversed(history) if "train_error" in h), None)
    result: dict[str, Any] = {
        "arch": arch,
        "lr": spec["lr"],
        "epochs_done": loop.epoch,
        "diverged": loop.diverged,
        "final_error": None if loop.diverged or last is None else last["train_error"],
        "final_loss": None if loop.diverged or last is None else last["train_loss"],
        "lrs": lrs,
        "device": str(device),
        "samples": len(x),
    }
    if measure:
        result["history"] = history
        if not loop.diverged:
            from ..taylor import taylor_curve

            t0 = time.perf_counter()
            tc = taylor_curve(_taylor_model(config, model, x), x, x, y, error="kl")
            result["taylor"] = {
                "loss": tc["loss"].tolist(),
                "error_rate": tc["error_rate"].tolist(),
                "seconds": time.perf_counter() - t0,
            }
            result["eval_loss"], result["eval_error"] = evaluate(model, x, y, train_mode=False)
    else:
        result["history"] = [
            {k: h[k] for k in ("epoch", "train_loss", "train_error", "lr") if k in h}
            for h in history
        ]
    return _json_safe(result)


def check_result(config: dict, spec: dict, result: dict) -> None:
    if not isinstance(result.get("diverged"), bool) or not isinstance(result.get("history"), list):
        raise ValueError("not a training result")
    check_number(result.get("lr"), "'lr'")
    check_number(result.get("epochs_done"), "'epochs_done'", integer=True)
    if not result["diverged"]:
        for k in ("final_error", "final_loss"):
            check_number(result.get(k), repr(k))
    hist = result["history"]
    for i, h in enumerate(hist):
        if not isinstance(h, dict):
            raise ValueError(f"'history'[{i}] is not an epoch's record")
        check_number(h.get("epoch"), f"'history'[{i}]['epoch']", integer=True)
        if not h.get("diverged"):
            # null: the non-finite loss of a diverged run's last epoch (the search drops "diverged")
            for k in ("train_loss", "train_error"):
                check_number(
                    h.get(k),
                    f"'history'[{i}][{k!r}]",
                    none=result["diverged"] and i == len(hist) - 1,
                )
        for k in ("gsc", "preact_std", "sign_diversity", "opnorm"):  # null: non-finite
            if k in h:
                check_numbers(h[k], f"'history'[{i}][{k!r}]", none=True)


# ----------------------------------------------------------------------------- the studies
def make_config(
    *,
    dataset: str = "cifar10",
    data_dir: str = "data",
    data_md5: str | None = None,
    download: bool = False,
    archs: list[str] | None = None,
    lrs: list[float] | None = None,
    search_epochs: int | None = None,
    epochs: int = 500,
    depth: int = 50,
    width: int = 100,
    batch_size: int = 100,
    momentum: float = 0.0,
    patience: int = 5,
    factor: float = 1 / 3,
    ed_samples: int = 5000,
    ed_every: int = 50,
    tau: float = 0.01,
    bn_datapoint: str = "frozen",
    seed: int = 0,
    backend: str = "auto",
    device: str = "cpu",
) -> dict[str, Any]:
    """The study's configuration (the paper's scale by default), checked."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if bn_datapoint not in BN_DATAPOINTS:
        raise ValueError(f"bn_datapoint must be one of {BN_DATAPOINTS}, got {bn_datapoint!r}")
    archs = list(archs or PAPER_ARCHS)
    bad = [a for a in archs if a not in ARCHS]
    if bad or len(set(archs)) != len(archs):
        raise ValueError(
            f"architectures must be distinct names among {', '.join(ARCHS)}, got {archs}"
        )
    lrs = [float(v) for v in (lrs or PAPER_LRS)]
    if not lrs or any(not (v > 0 and math.isfinite(v)) for v in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"learning rates must be distinct positive numbers, got {lrs}")
    search_epochs = epochs if search_epochs is None else search_epochs
    check_integers(
        ("epochs", epochs, 0),
        ("search_epochs", search_epochs, 1),
        ("depth", depth, 1),
        ("width", width, 1),
        ("batch_size", batch_size, 2),
        ("patience", patience, 1),
        ("ed_samples", ed_samples, 0),
        ("ed_every", ed_every, 0),
    )
    if not 0 < factor <= 1:
        raise ValueError(f"factor must lie in (0, 1], got {factor}")
    return {
        "dataset": dataset,
        "data_dir": str(data_dir) if dataset == "cifar10" else None,
        "data_md5": data_md5 if dataset == "cifar10" else None,
        "download": bool(download) if dataset == "cifar10" else False,
        "archs": archs,
        "lrs": lrs,
        "search_epochs": search_epochs,
        "epochs": epochs,
        "depth": depth,
        "width": width,
        "batch_size": batch_size,
        "momentum": float(momentum),
        "optimizer": "sgd",
        "patience": patience,
        "factor": float(factor),
        "ed_samples": ed_samples,
        "ed_every": ed_every,
        "tau": float(tau),
        "bn_datapoint": bn_datapoint,
        "seed": int(seed),
        "backend": backend,
        "device": device,
    }


def _lr_key(lr: float) -> str:
    return f"lr{lr:.6g}"


def make_search_study(config: dict[str, Any], out: Path) -> Study:
    """Jobs ``<arch>.lr<rate>`` training ``search_epochs`` epochs each."""
    ck = (out / "checkpoints").resolve()
    jobs = [
        Job(
            f"{a}.{_lr_key(lr)}",
            {
                "arch": a,
                "lr": lr,
                "epochs": config["search_epochs"],
                "measure": False,
                "checkpoint": str(ck / f"{a}.{_lr_key(lr)}.pt"),
            },
        )
        for a in config["archs"]
        for lr in config["lrs"]
    ]
    return Study(
        f"{NAME}-search", config, jobs, train_job, check_result, gpu=config["device"] != "cpu"
    )


def choose_lrs(config: dict[str, Any], records: dict[str, dict]) -> dict[str, float | None]:
    """Per architecture the rate with the lowest final training error (ties: lower final loss, then
    the larger rate); None if every rate diverged."""
    best: dict[str, float | None] = {}
    for a in config["archs"]:
        cands = [
            r["result"]
            for r in records.values()
            if r["spec"]["arch"] == a and not r["result"]["diverged"]
        ]
        cands.sort(key=lambda r: (r["final_error"], r["final_loss"], -r["lr"]))
        best[a] = cands[0]["lr"] if cands else None
    return best


def make_final_study(config: dict[str, Any], chosen: dict[str, float | None], out: Path) -> Study:
    """Jobs ``<arch>``: ``epochs`` epochs at the chosen rate with every measurement."""
    ck = (out / "checkpoints").resolve()
    cfg = {**config, "chosen_lrs": chosen}
    jobs = [
        Job(
            a,
            {
                "arch": a,
                "lr": lr,
                "epochs": config["epochs"],
                "measure": True,
                "checkpoint": str(ck / f"{a}.pt"),
            },
        )
        for a, lr in chosen.items()
        if lr is not None
    ]
    return Study(f"{NAME}-final", cfg, jobs, train_job, check_result, gpu=config["device"] != "cpu")


# ----------------------------------------------------------------------------- outputs


def datapoint(config: dict, arch: str) -> str:
    """What one datapoint of ``arch``'s measurements is: ``"image"``, or ``"set"`` (the whole
    measured set, for batch norm with ``bn_datapoint="batch"``)."""
    return "set" if ARCHS[arch][1] == "batch" and config["bn_datapoint"] == "batch" else "image"


def aggregate(
    config: dict, search: dict[str, dict], final: dict[str, dict], chosen: dict[str, float | None]
) -> dict[str, Any]:
    archs: dict[str, Any] = {}
    for a in config["archs"]:
        s = [
            {
                "lr": r["result"]["lr"],
                "diverged": r["result"]["diverged"],
                "final_error": r["result"]["final_error"],
                "final_loss": r["result"]["final_loss"],
                "epochs_done": r["result"]["epochs_done"],
                "seconds": r["seconds"],
            }
            for r in search.values()
            if r["spec"]["arch"] == a
        ]
        archs[a] = {
            "act": ARCHS[a][0],
            "norm": ARCHS[a][1],
            "datapoint": datapoint(config, a),
            "search": s,
            "lr": chosen.get(a),
        }
        if a in final:
            res = final[a]["result"]
            archs[a].update(
                {
                    k: res.get(k)
                    for k in (
                        "diverged",
                        "final_error",
                        "final_loss",
                        "eval_error",
                        "eval_loss",
                        "history",
                        "taylor",
                        "lrs",
                        "samples",
                    )
                }
            )
            archs[a]["seconds"] = final[a]["seconds"]
    return {"study": NAME, "config": config, "chosen_lrs": chosen, "archs": archs}


def epochs_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [
        "arch",
        "epoch",
        "lr",
        "train_loss",
        "train_error",
        "gsc_L0",
        "ed_subset",
        "ed_full",
        "t_train",
        "t_error",
        "t_gsc",
        "t_opnorm",
        "t_ed_subset",
        "t_ed_full",
    ]
    w.writerow(cols)
    for a, r in results["archs"].items():
        for h in r.get("history") or []:
            if h.get("diverged"):
                w.writerow([a, h["epoch"], *[""] * (len(cols) - 2)])
                continue
            t = h.get("seconds", {})
            w.writerow(
                [
                    a,
                    h["epoch"],
                    _num(h.get("lr")),
                    _num(h["train_loss"]),
                    _num(h["train_error"]),
                    _num(h["gsc"][-1]),
                    _num(h.get("ed_subset")),
                    _num(h.get("ed_full")),
                    *(
                        _num(t.get(k))
                        for k in ("train", "error", "gsc", "opnorm", "ed_subset", "ed_full")
                    ),
                ]
            )
    return buf.getvalue()


def layers_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "arch",
            "epoch",
            "l",
            "gsc",
            "opnorm",
            "preact_std",
            "sign_diversity",
            "contribution_subset",
            "contribution_full",
        ]
    )
    for a, r in results["archs"].items():
        for h in r.get("history") or []:
            if "gsc" not in h:
                continue
            ps, pf = h.get("profile_subset"), h.get("profile_full")
            for l in range(len(h["gsc"])):
                # contribution_*: c(L, lambda) with lambda = l (the last row of the profile)
                w.writerow(
                    [
                        a,
                        h["epoch"],
                        l,
                        _num(h["gsc"][l]),
                        _num(h["opnorm"][l]),
                        _num(h["preact_std"][l]),
                        _num(h["sign_diversity"][l]),
                        _num(ps[l]) if ps else "",
                        _num(pf[l]) if pf else "",
                    ]
                )
    return buf.getvalue()


def taylor_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arch", "K", "loss", "error_rate"])
    for a, r in results["archs"].items():
        t = r.get("taylor")
        if t:
            for k, (lo, er) in enumerate(zip(t["loss"], t["error_rate"])):
                w.writerow([a, k, _num(lo), _num(er)])
    return buf.getvalue()


def search_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["arch", "lr", "diverged", "final_error", "final_loss", "epochs_done", "chosen", "seconds"]
    )
    for a, r in results["archs"].items():
        for s in r["search"]:
            w.writerow(
                [
                    a,
                    repr(s["lr"]),
                    int(s["diverged"]),
                    _num(s["final_error"]),
                    _num(s["final_loss"]),
                    s["epochs_done"],
                    int(s["lr"] == r["lr"]),
                    f"{s['seconds']:.3f}",
                ]
            )
    return buf.getvalue()


def plot(results: dict, paths: list[Path]) -> None:
    """Figure 3: (A) training error, (B) GSC(L, 0), (C) effective depth, (D) operator norms of
    W_t - W_0 at the end, (E) Taylor curve; one line per architecture."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.6))
    colors = plt.get_cmap("tab10").colors
    for i, (a, r) in enumerate(results["archs"].items()):
        c = colors[i % 10]
        hist = [h for h in (r.get("history") or []) if "gsc" in h]
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        axes[0].plot(ep, [h["train_error"] for h in hist], color=c, label=f"{a} (lr {r['lr']:g})")
        axes[1].plot(
            ep, [h["gsc"][-1] if h["gsc"][-1] is not None else np.nan for h in hist], color=c
        )
        if any("ed_subset" in h for h in hist):
            axes[2].plot(ep, [h.get("ed_subset", np.nan) for h in hist], color=c)
        full = [(h["epoch"], h["ed_full"]) for h in hist if "ed_full" in h]
        if full:
            axes[2].plot(*zip(*full), "o", color=c, markersize=4)
        on = hist[-1]["opnorm"]
        axes[3].plot(range(len(on)), [v if v is not None else np.nan for v in on], color=c)
        t = r.get("taylor")
        if t:
            axes[4].plot(range(len(t["error_rate"])), t["error_rate"], color=c)
    titles = (
        "(A) training classification error",
        "(B) GSC(L, 0)",
        "(C) effective depth (line: subset, dots: full set)",
        "(D) ||W_t - W_0||_2 per layer (final)",
        "(E) Taylor test: error after reducing K layers",
    )
    xlabels = ("epoch", "epoch", "epoch", "compositional depth l", "K")
    for ax, ti, xl in zip(axes, titles, xlabels):
        ax.set_title(ti, fontsize=10)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    for ax in (axes[1], axes[3]):  # log scale where there is something positive to show
        if any(
            v > 0
            for line in ax.get_lines()
            for v in np.asarray(line.get_ydata(), float)
            if np.isfinite(v)
        ):
            ax.set_yscale("log")
    cfg = results["config"]
    fig.suptitle(
        f"{cfg['dataset']}: {cfg['depth']} layers x {cfg['width']} + output layer, "
        f"{cfg['epochs']} epochs; batch norm measured with --bn-datapoint "
        f"{cfg['bn_datapoint']}",
        fontsize=10,
    )
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=max(1, len(lab)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, paths, dpi=130)


def _f(v: Any, d: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}g}"


def _bn_notes(results: dict) -> list[str]:
    """summary.md's notes on what one datapoint of a batch-norm architecture is, and why."""
    cfg = results["config"]
    n = {r.get("samples") for r in results["archs"].values()} - {None}
    here = f" (B = {n.pop():,} here)" if len(n) == 1 else ""
    why = (
        "The KL error is positive, so with the whole set as one datapoint `f_0 = sum_i e_i` grows "
        f"like the number B of measured images{here} while the Jacobian's norm does not: "
        "GSC(l, 0) scales like 1/B and changes with how many images are measured"
    )
    if cfg["bn_datapoint"] == "frozen":
        return [
            "- Batch norm: trained in train mode (batch statistics of each minibatch). Measured "
            "with `--bn-datapoint frozen` (the default; definitions.md's (choice)): every "
            "measurement (GSC, pre-activation statistics, effective depth) uses the batch "
            'statistics of the whole measured set held constant (`batchnorm="frozen"`), so each '
            "image is one datapoint, as for the architectures without batch norm. " + why + ", so "
            "the coupled form (`--bn-datapoint batch`, the whole set one datapoint) is not "
            "comparable across architectures or set sizes. The effective depth on the subset uses "
            "the subset's own statistics.",
            "- Taylor curve: it expands the same function (batch norm frozen at the whole "
            "training set's statistics), so its K = 0 is the training error; the eval-mode error "
            "(running statistics) is `eval_error` in results.json.",
        ]
    return [
        "- Batch norm: trained in train mode (batch statistics of each minibatch). Measured with "
        "`--bn-datapoint batch`: every measurement uses train-mode batch norm over the whole "
        "measured set (the whole subset for the subset's effective depth), which is then **one "
        "datapoint** (definitions.md). " + why + ", so the batch-norm architectures' GSC(l, 0) is "
        "not comparable with the other architectures' or across set sizes; the default "
        "`--bn-datapoint frozen` measures every image as one datapoint.",
        "- Taylor curve: the coupled function has no per-image expansion, so it uses eval mode "
        "(running statistics); its K = 0 equals the eval-mode error (`eval_error` in "
        "results.json).",
    ]


def summary_md(results: dict, info: dict) -> str:
    cfg = results["config"]
    L = cfg["depth"] + 1
    lines = [
        "# CIFAR study (Philipp, Song & Carbonell 2018, Figure 3)",
        "",
        f"gscfast {info['version']}: dataset {cfg['dataset']}, {len(cfg['archs'])} architectures, "
        f"{cfg['depth']} hidden layers of width {cfg['width']} + output layer to 10 classes "
        f"(L = {L}), KL error layer; SGD (momentum {cfg['momentum']:g}), batch size "
        f"{cfg['batch_size']}, learning rate x{cfg['factor']:.4g} after {cfg['patience']} epochs "
        f"without a new minimum of the training classification error; search over "
        f"{len(cfg['lrs'])} rates for {cfg['search_epochs']} epochs, final runs "
        f"{cfg['epochs']} epochs; seed {cfg['seed']}.",
        "",
        "## Results",
        "",
        f"Batch-norm architectures measured with `--bn-datapoint {cfg['bn_datapoint']}`: "
        + (
            "every image is one datapoint (the measured set's batch statistics held constant)."
            if cfg["bn_datapoint"] == "frozen"
            else "the whole measured set is one datapoint (GSC(l, 0) scales like 1/B)."
        )
        + " See the notes.",
        "",
        "| architecture | datapoint | chosen lr | final training error | final loss "
        "| GSC(L, 0) final | effective depth (subset) | effective depth (full) "
        "| Taylor error at K = 0 / K = L |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a, r in results["archs"].items():
        hist = [h for h in (r.get("history") or []) if "gsc" in h]
        last = hist[-1] if hist else {}
        full = [h for h in hist if "ed_full" in h]
        t = r.get("taylor") or {}
        te = t.get("error_rate")
        lines.append(
            f"| {a} | {r['datapoint']} | {_f(r['lr'])} | {_f(r.get('final_error'))} "
            f"| {_f(r.get('final_loss'))} "
            f"| {_f((last.get('gsc') or [None])[-1])} | {last.get('ed_subset', 'n/a')} "
            f"| {full[-1]['ed_full'] if full else 'n/a'} "
            f"| {_f(te[0]) if te else 'n/a'} / {_f(te[-1]) if te else 'n/a'} |"
        )
    lines += [
        "",
        "## Learning-rate search",
        "",
        "| architecture | rates tried | diverged | best final error |",
        "| --- | --- | --- | --- |",
    ]
    for a, r in results["archs"].items():
        s = r["search"]
        errs = [x["final_error"] for x in s if not x["diverged"]]
        lines.append(
            f"| {a} | {len(s)} | {sum(x['diverged'] for x in s)} "
            f"| {_f(min(errs)) if errs else 'n/a (all diverged)'} |"
        )
    lines += [
        "",
        "## Effective depth: subset against full set",
        "",
        f"Exact effective depth every epoch on a fixed seeded subset of {cfg['ed_samples']} "
        f"training points, over the whole set every {cfg['ed_every']} epochs (and at the end).",
        "",
        "| architecture | epoch | subset | full set | max abs. diff. of c(L, lambda) / sum |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a, r in results["archs"].items():
        for h in r.get("history") or []:
            if "ed_full" in h and "ed_subset" in h:
                ps, pf = np.array(h["profile_subset"], float), np.array(h["profile_full"], float)
                with np.errstate(all="ignore"):
                    dif = np.nanmax(np.abs(ps / np.nansum(ps) - pf / np.nansum(pf)))
                lines.append(
                    f"| {a} | {h['epoch']} | {h['ed_subset']} | {h['ed_full']} | {_f(float(dif), 3)} |"
                )
    lines += [
        "",
        "## Timings per epoch (seconds, mean over epochs)",
        "",
        "| architecture | training | error (full set) | GSC + pre-activation stats (full set) "
        "| operator norms | effective depth (subset) | effective depth (full set) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a, r in results["archs"].items():
        hs = [h["seconds"] for h in (r.get("history") or []) if "seconds" in h]
        lines.append(
            f"| {a} | "
            + " | ".join(
                _f(_mean([t.get(k) for t in hs]), 3)
                for k in ("train", "error", "gsc", "opnorm", "ed_subset", "ed_full")
            )
            + " |"
        )
    lines += [
        "",
        f"Machine: {info['machine']}; engine {info['engine']}, {info['threads']} CPU threads "
        "per job.",
        "",
        "## Notes",
        "",
        *_bn_notes(results),
        "- Diverged: a non-finite loss or weight stops the job; it is never chosen.",
        "",
        *config_section(cfg),
        "## Files",
        "",
        "- `figure3.png`, `figure3.pdf`: error, GSC(L, 0), effective depth, operator norms, "
        "Taylor curve.",
        "- `results.json`: every number (per architecture: search results, chosen rate, "
        "per-epoch history with per-layer GSC, pre-activation statistics, operator norms, "
        "the contribution row c(L, lambda) of the effective depth (`profile_subset`, "
        "`profile_full`), timings; the whole [L+1, L+1] profile on the subset at the last "
        "epoch (`profile_subset_matrix`, indexed [l, lambda]); Taylor curve).",
        "- `epochs.csv` (one row per architecture and epoch), `layers.csv` (one row per "
        "architecture, epoch and layer l; `contribution_*` is c(L, lambda = l)), `taylor.csv`, "
        "`search.csv`.",
        "- `search/`, `final/`: the two runner directories (manifest, jobs, checkpoints); "
        "rerun the same command with `--resume` to continue or regenerate.",
        "",
    ]
    return "\n".join(lines)


OUTPUTS = (
    "figure3.png",
    "figure3.pdf",
    "results.json",
    "epochs.csv",
    "layers.csv",
    "taylor.csv",
    "search.csv",
    "summary.md",
)


def write_outputs(out: str | Path, config: dict, search, final, chosen: dict) -> dict[str, Path]:
    """``OUTPUTS`` from the complete search and final runs."""
    results = aggregate(config, search.records, final.records, chosen)
    files = [
        text_file("epochs.csv", epochs_csv(results)),
        text_file("layers.csv", layers_csv(results)),
        text_file("taylor.csv", taylor_csv(results)),
        text_file("search.csv", search_csv(results)),
        figure_files("figure3", lambda paths: plot(results, paths)),
    ]
    return write_files(out, final, results, files, summary_md)


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="cifar10",
        help="cifar10 (official archive in --data-dir) or digits (scikit-learn's bundled "
        "8x8 digits, no download)",
    )
    add_data_arguments(p, "cifar-10-python.tar.gz")
    p.add_argument(
        "--archs",
        nargs="+",
        default=PAPER_ARCHS,
        metavar="ARCH",
        help=f"architectures among {', '.join(ARCHS)} (default: all four)",
    )
    p.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=None,
        metavar="LR",
        help="learning rates of the search (default 1e5, 3e4, 1e4, ..., 3e-5, 1e-5)",
    )
    p.add_argument(
        "--search-epochs", type=int, default=None, help="epochs per search job (default: --epochs)"
    )
    p.add_argument("--epochs", type=int, default=500, help="epochs of the final runs (default 500)")
    p.add_argument("--depth", type=int, default=50, help="hidden layers (default 50)")
    p.add_argument("--width", type=int, default=100, help="their width (default 100)")
    p.add_argument("--batch-size", type=int, default=100, help="SGD minibatch (default 100)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="epochs without a new minimum of the training error before the rate is "
        "multiplied by --factor (default 5)",
    )
    p.add_argument("--factor", type=float, default=1 / 3, help="rate multiplier (default 1/3)")
    p.add_argument(
        "--ed-samples",
        type=int,
        default=5000,
        help="size of the fixed subset for the per-epoch effective depth (default 5000; 0: off)",
    )
    p.add_argument(
        "--ed-every",
        type=int,
        default=50,
        help="effective depth over the whole training set every N epochs and at the end "
        "(default 50; 0: never)",
    )
    p.add_argument(
        "--tau", type=float, default=0.01, help="effective-depth threshold (default 0.01)"
    )
    p.add_argument(
        "--bn-datapoint",
        choices=BN_DATAPOINTS,
        default="frozen",
        help="batch-norm architectures: 'frozen' (default) measures every image as one "
        "datapoint, the measured set's batch statistics held constant; 'batch' "
        "makes the whole measured set one datapoint, whose GSC(l, 0) scales like "
        "1/(number of images) with the positive KL error",
    )
    add_study_arguments(p, NAME, device="cpu", dtype=None)


def main(args: argparse.Namespace) -> int:
    global _PROGRESS
    config = config_from_args(make_config, args)
    out = Path(args.out)

    def phases(run_phase: PhaseRunner) -> dict[str, Path]:
        # The runner checks each phase's folder; the top folder holds only the phases.
        if out.exists() and any(out.iterdir()) and not args.resume:
            raise UsageError(
                f"{out} is not empty; pass --resume to continue the run stored there, "
                "or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        search = run_phase(make_search_study(config, out / "search"), out / "search", "search ")
        chosen = choose_lrs(config, search.records)
        final_study = make_final_study(config, chosen, out / "final")
        final = run_phase(final_study, out / "final", "final ")
        paths = write_outputs(out, config, search, final, chosen)
        if not args.quiet:
            res = json.loads(paths["results.json"].read_text())
            for a, r in res["archs"].items():
                h = [x for x in (r.get("history") or []) if "gsc" in x]
                print(
                    f"{a:<12} lr {_f(r['lr'])}  final error {_f(r.get('final_error'))}  "
                    f"GSC(L,0) {_f(h[-1]['gsc'][-1] if h else None)}"
                )
        return paths

    _PROGRESS = not args.quiet
    try:
        return run_phases(args, phases, kept="finished jobs and per-epoch checkpoints are")
    finally:
        _PROGRESS = False
