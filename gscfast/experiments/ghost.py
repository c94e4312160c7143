"""Forward/backward scaling in plain and residual networks (after "Revisiting exploding gradient:
a ghost that never leaves", 2024).

PlainNet and ResNet MLPs (default 20 weight layers of width 256): a stem ``linear -> [batch norm]
-> activation``, then plain layers of the same kind or basic residual blocks
``act(x + scale * BN(W2 act(BN(W1 x))))``, then a linear head. A batch of 128 inputs
``x ~ N(0, I)`` goes forward, a gradient ``g ~ N(0, I/d)`` is injected at the head's output, and
the norm of every weight matrix's gradient is recorded, for a fresh network and fresh data in
each of 4,096 repeats. Per variant: the mean gradient norm of every layer against the layer index
and the measured per-layer growth rate of the mean squared gradient norm (towards the input),
beside r(s) = E[s'(z)^2] / Var[s(z)] of definitions.md, which predicts it for plain batch-norm
networks. gscfast's GSC(l, 0) of the same networks (error <g, output>) is recorded beside.

Variants: ``{plain,res,res-sqrt}-{relu,tanh,selu}[-bn]``; ``res-sqrt`` scales each residual
branch by 1/sqrt(number of blocks). One job is one (variant, chunk of repeats);
``gscfast.experiments.runner`` runs and stores them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..estimators import GSCMoments, pooled_summary
from ..nn import Residual
from ..theory import R_S
from .outputs import (
    add_study_arguments,
    check_backend,
    check_integers,
    check_number,
    check_numbers,
    config_from_args,
    config_section,
    expand_names,
    figure_files,
    fmt,
    invocation_line,
    num,
    pyplot,
    resolve_device,
    resolve_dtype,
    run_command,
    save_figure,
    sci,
    t_interval,
    text_file,
    write_files,
)
from .runner import (
    Job,
    OutdatedRecord,
    Study,
    job_seed,
)

__all__ = [
    "ACTIVATIONS",
    "GROUPS",
    "NETS",
    "VARIANTS",
    "add_arguments",
    "aggregate",
    "expand_variants",
    "ghost_net",
    "growth_rate",
    "main",
    "make_config",
    "make_study",
    "parse_variant",
    "redraw_weights",
    "run_job",
    "weight_grad_norms",
    "write_outputs",
]

NAME = "ghost"
HELP = (
    "forward/backward scaling of plain and residual MLPs: per-layer weight-gradient norms vs r(s)"
)

# activation -> (module, weight variance x fan_in, the initialization's name): He for ReLU,
# Glorot for tanh (2 / (fan_in + fan_out) = 1 / d for square layers), LeCun for SELU (its own).
ACTIVATIONS: dict[str, tuple[type[nn.Module], float, str]] = {
    "relu": (nn.ReLU, 2.0, "He"),
    "tanh": (nn.Tanh, 1.0, "Glorot"),
    "selu": (nn.SELU, 1.0, "LeCun"),
}
NETS = ("plain", "res", "res-sqrt")
VARIANTS = [f"{net}-{act}{bn}" for net in NETS for bn in ("-bn", "") for act in ACTIVATIONS]
GROUPS: dict[str, list[str]] = {
    "all": VARIANTS,
    "plain": [v for v in VARIANTS if v.startswith("plain-")],
    "res": [v for v in VARIANTS if not v.startswith("plain-")],
    "bn": [v for v in VARIANTS if v.endswith("-bn")],
}


def parse_variant(name: str) -> dict[str, Any]:
    """``"res-sqrt-tanh-bn"`` -> ``{"net": "res-sqrt", "act": "tanh", "bn": True}``."""
    bn = name.endswith("-bn")
    rest = name[:-3] if bn else name
    net, _, act = rest.rpartition("-")
    if net not in NETS or act not in ACTIVATIONS:
        raise ValueError(
            f"unknown variant {name!r}: use NET-ACT or NET-ACT-bn with NET in "
            f"{', '.join(NETS)} and ACT in {', '.join(ACTIVATIONS)} (e.g. plain-relu-bn), "
            f"or a group: {', '.join(GROUPS)}"
        )
    return {"net": net, "act": act, "bn": bn}


def expand_variants(words: list[str]) -> list[str]:
    """``--variants`` words (names or groups) -> variant names, without repeats, checked."""
    return expand_names(words, GROUPS, parse_variant, "variants")


# ----------------------------------------------------------------------------- networks
def ghost_net(
    net: str,
    act: str,
    bn: bool,
    *,
    width: int = 256,
    depth: int = 20,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """PlainNet / ResNet MLP with ``depth`` weight layers of width ``width`` (no biases).

    Layer 1 is ``linear -> [BN] -> act``; layers ``2..depth-1`` are either the same (``net =
    "plain"``) or ``(depth - 2) / 2`` basic blocks ``act(x + scale * [BN] W2 act([BN] W1 x))``
    (``"res"``: scale 1; ``"res-sqrt"``: scale 1/sqrt(blocks)); layer ``depth`` is a linear head.
    Weights ``N(0, c / fan_in)`` with ``c`` from ``ACTIVATIONS`` (the head: ``c = 1``); batch norm
    without affine parameters (its initial values), using batch statistics (train mode).
    """
    if net not in NETS or act not in ACTIVATIONS:
        raise ValueError(f"unknown network {net!r} / activation {act!r}")
    if depth < 3 or width < 1:
        raise ValueError(f"depth must be >= 3 and width >= 1, got depth={depth}, width={width}")
    if net != "plain" and depth % 2:
        raise ValueError(
            f"a ResNet has a stem, (depth - 2) / 2 two-layer blocks and a head, so "
            f"depth must be even, got {depth}"
        )
    Act = ACTIVATIONS[act][0]

    def linear() -> nn.Linear:  # weights drawn below, by redraw_weights
        return nn.utils.skip_init(nn.Linear, width, width, bias=False, dtype=dtype)

    def unit(last_act: bool = True) -> list[nn.Module]:
        mods: list[nn.Module] = [linear()]
        if bn:
            mods.append(nn.BatchNorm1d(width, affine=False, dtype=dtype))
        return mods + ([Act()] if last_act else [])

    layers = unit()
    if net == "plain":
        for _ in range(depth - 2):
            layers += unit()
    else:
        blocks = (depth - 2) // 2
        scale = 1.0 if net == "res" else 1.0 / math.sqrt(blocks)
        for _ in range(blocks):
            layers += [Residual(nn.Sequential(*unit(), *unit(last_act=False)), scale), Act()]
    layers.append(linear())
    model = nn.Sequential(*layers)
    redraw_weights(model, act, generator)
    return model


def redraw_weights(model: nn.Module, act: str, generator: torch.Generator | None = None) -> None:
    """Draw every ``nn.Linear`` weight of a ``ghost_net`` afresh, in place: ``N(0, c / fan_in)``,
    ``c`` from ``ACTIVATIONS`` and ``c = 1`` for the head (the last one). A repeat of the study
    redraws one network instead of building a new one: building costs as much as the gradients."""
    gen = generator if generator is not None else torch.Generator().manual_seed(torch.seed())
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(lins):
            c = 1.0 if i == len(lins) - 1 else ACTIVATIONS[act][1]
            # Drawn in float32 on the CPU whatever the dtype and device: the same network everywhere.
            w = torch.randn(lin.weight.shape, generator=gen).mul_(
                math.sqrt(c / lin.weight.shape[1])
            )
            lin.weight.copy_(w)


def weight_grad_norms(model: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """``||d <g, model(x)> / d W_l||_F`` for every ``nn.Linear`` weight, in forward order: ``[L]``."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(model(x), weights, g)
    return torch.stack([q.norm() for q in grads])


def fit_layers(depth: int) -> list[int]:
    """Layer indices (1-based) the rate is fitted over: the hidden layers ``2..depth-1`` (the
    stem sees the raw input and the head has neither norm nor activation)."""
    return list(range(2, depth))


def growth_rate(mean_sq: np.ndarray, depth: int) -> float:
    """Per-layer growth, towards the input, of the mean squared gradient norm: ``exp(-slope)`` of
    the least-squares line through ``log mean_sq[l]`` over ``fit_layers``."""
    ls = np.array(fit_layers(depth), dtype=np.float64)
    y = np.log(np.asarray(mean_sq, dtype=np.float64)[ls.astype(int) - 1])
    if not np.all(np.isfinite(y)):
        return math.nan
    slope = np.polyfit(ls, y, 1)[0]
    return float(math.exp(-slope))


# ----------------------------------------------------------------------------- one job
def run_job(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["repeats"]`` fresh networks and batches: sums over them of every layer's gradient
    norm, its square and its fourth power; the raw expectations of gscfast's GSC of the first
    network (``gsc_moments``, pooled over chunks by ``aggregate``)."""
    from .. import gsc_moments

    device, dtype = resolve_device(config["device"]), resolve_dtype(config["dtype"])
    v = parse_variant(spec["variant"])
    d, B, L = config["width"], config["batch"], config["depth"]
    gen = torch.Generator().manual_seed(spec["seed"])
    s1 = torch.zeros(L, dtype=torch.float64)
    s2, s4 = torch.zeros_like(s1), torch.zeros_like(s1)
    first = None
    model = ghost_net(v["net"], v["act"], v["bn"], width=d, depth=L, generator=gen, dtype=dtype).to(
        device
    )
    for r in range(spec["repeats"]):
        if r:
            redraw_weights(model, v["act"], gen)
        x = torch.randn(B, d, generator=gen).to(device=device, dtype=dtype)
        g = (torch.randn(B, d, generator=gen) / math.sqrt(d)).to(device=device, dtype=dtype)
        n = weight_grad_norms(model, x, g).detach().to("cpu", torch.float64)
        s1 += n
        s2 += n**2
        s4 += n**4
        if r == 0 and config["gsc"]:
            first = gsc_moments(model, x, g, error="dot", backend=config["backend"]).to_dict()
    return {
        "repeats": spec["repeats"],
        "sum_norm": s1.tolist(),
        "sum_sq": s2.tolist(),
        "sum_sq2": s4.tolist(),
        "gsc_moments": first,
        "device": str(device),
    }


def check_result(config: dict, spec: dict, result: dict) -> None:
    """Raises ``ValueError`` unless ``result`` looks like ``run_job``'s."""
    L = config["depth"]
    for key in ("sum_norm", "sum_sq", "sum_sq2"):
        # Overflowing norms are a result (growth_rate turns them into a NaN rate), not corruption.
        check_numbers(result.get(key), repr(key), L, finite=False)
    check_number(result.get("repeats"), "'repeats'", integer=True)
    if result["repeats"] != spec["repeats"]:
        raise ValueError("'repeats' does not match the job")
    if config["gsc"]:
        if "gsc_moments" not in result:
            raise OutdatedRecord(
                "this job record has no 'gsc_moments', the raw expectations that the pooled GSC "
                "is computed from (records of older gscfast versions lack them); recompute the run "
                "into a new --out, or delete this directory's jobs/ and manifest.json and run the "
                "same command again"
            )
        if GSCMoments.from_dict(result["gsc_moments"]).L != L:
            raise ValueError(f"'gsc_moments' does not have {L + 1} layers")


# ----------------------------------------------------------------------------- the study
def make_config(
    *,
    variants: list[str] | None = None,
    repeats: int = 4096,
    chunk: int = 256,
    width: int = 256,
    depth: int = 20,
    batch: int = 128,
    seed: int = 0,
    gsc: bool = True,
    backend: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """The study's configuration (the paper's scale by default), checked."""
    variants = expand_variants(variants or ["all"])
    check_integers(
        ("repeats", repeats, 1),
        ("chunk", chunk, 1),
        ("width", width, 1),
        ("depth", depth, 1),
        ("batch", batch, 1),
    )
    if batch < 2:
        raise ValueError("batch must be at least 2 (batch norm needs a batch)")
    if depth < 4:
        raise ValueError(f"depth must be at least 4 (stem, two hidden layers, head), got {depth}")
    if depth % 2 and any(parse_variant(v)["net"] != "plain" for v in variants):
        raise ValueError(
            f"ResNet variants need an even depth (stem, two-layer blocks, head), got {depth}"
        )
    check_backend(backend)
    resolve_dtype(dtype)
    return {
        "variants": variants,
        "repeats": repeats,
        "chunk": min(chunk, repeats),
        "width": width,
        "depth": depth,
        "batch": batch,
        "seed": int(seed),
        "gsc": bool(gsc),
        "backend": backend,
        "device": device,
        "dtype": dtype,
    }


def make_study(config: dict[str, Any]) -> Study:
    """Jobs ``<variant>.<chunk>``, variant-major; each chunk has its own seed (from ``seed``, the
    variant and the chunk index), so the numbers do not depend on job order, engine or resume."""
    jobs = []
    for variant in config["variants"]:
        for c, start in enumerate(range(0, config["repeats"], config["chunk"])):
            n = min(config["chunk"], config["repeats"] - start)
            jobs.append(
                Job(
                    f"{variant}.{c:04d}",
                    {
                        "variant": variant,
                        "chunk": c,
                        "repeats": n,
                        "seed": job_seed(config["seed"], variant, c),
                    },
                )
            )
    return Study(NAME, config, jobs, run_job, check_result, gpu=config["device"] != "cpu")


# ----------------------------------------------------------------------------- aggregation
def aggregate(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per variant: every layer's mean gradient norm, mean squared norm (and its standard error),
    the growth rate of the mean squared norm with a 95% t-interval over chunks, r(s), and the
    pooled expected GSC(l, 0) of the chunks' first networks with its bootstrap band over them
    (``gscfast.estimators.pooled_summary``)."""
    L = config["depth"]
    out: dict[str, Any] = {}
    for variant in config["variants"]:
        recs = sorted(
            (r for r in records.values() if r["spec"]["variant"] == variant),
            key=lambda r: r["spec"]["chunk"],
        )
        n = sum(r["result"]["repeats"] for r in recs)
        s1, s2, s4 = (
            np.sum([r["result"][k] for r in recs], axis=0)
            for k in ("sum_norm", "sum_sq", "sum_sq2")
        )
        mean_sq = s2 / n
        se_sq = np.sqrt(np.maximum(s4 / n - mean_sq**2, 0) / max(n - 1, 1))
        chunk_rates = [
            growth_rate(np.array(r["result"]["sum_sq"]) / r["result"]["repeats"], L) for r in recs
        ]
        _, low, high, sd = t_interval(np.array(chunk_rates))
        moments = [
            GSCMoments.from_dict(r["result"]["gsc_moments"])
            for r in recs
            if r["result"].get("gsc_moments") is not None
        ]
        v = parse_variant(variant)
        out[variant] = {
            **v,
            "repeats": n,
            "init": ACTIVATIONS[v["act"]][2],
            "rate": {
                "value": growth_rate(mean_sq, L),
                "ci95": [low, high],
                "chunk_std": sd,
                "chunks": len(recs),
            },
            "r_s": R_S[v["act"]],
            "predicted": v["net"] == "plain" and v["bn"],
            "mean_norm": (s1 / n).tolist(),
            "mean_sq": mean_sq.tolist(),
            "se_sq": se_sq.tolist(),
            "gsc": (
                pooled_summary(moments, seed=job_seed(config["seed"], "bootstrap", variant))
                if moments
                else None
            ),
        }
    return {"study": NAME, "config": config, "fit_layers": fit_layers(L), "variants": out}


# ----------------------------------------------------------------------------- outputs
def layers_csv(results: dict[str, Any]) -> str:
    """One row per (variant, weight layer l = 1..L); ``gsc`` is the pooled GSC(l, 0) of that layer's
    output, ``gsc_lo``/``gsc_hi`` its 95% bootstrap band."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "l", "mean_norm", "mean_sq", "se_sq", "gsc", "gsc_lo", "gsc_hi"])
    for name, v in results["variants"].items():
        g = v["gsc"]
        for i, (m, q, e) in enumerate(zip(v["mean_norm"], v["mean_sq"], v["se_sq"])):
            w.writerow(
                [
                    name,
                    i + 1,
                    num(m),
                    num(q),
                    num(e),
                    *((num(g[k][i + 1]) for k in ("gsc", "gsc_lo", "gsc_hi")) if g else ("",) * 3),
                ]
            )
    return buf.getvalue()


_COLORS = {"plain": "C0", "res": "C1", "res-sqrt": "C2"}


def plot(results: dict[str, Any], paths: list[Path]) -> None:
    """Top row, one panel per activation: mean weight-gradient norm against the layer index (log
    scale), one line per variant (solid: batch norm), with the slope r(s) predicts for the plain
    batch-norm net. Bottom row: gscfast's GSC(l, 0) of the same networks."""
    plt = pyplot()
    cfg = results["config"]
    acts = [a for a in ACTIVATIONS if any(v["act"] == a for v in results["variants"].values())]
    with_gsc = any(v["gsc"] for v in results["variants"].values())
    rows = 2 if with_gsc else 1
    fig, axes = plt.subplots(rows, len(acts), figsize=(5.2 * len(acts), 4.3 * rows), squeeze=False)
    l = np.arange(1, cfg["depth"] + 1)
    fit = np.array(results["fit_layers"])
    for j, act in enumerate(acts):
        ax = axes[0, j]
        for name, v in results["variants"].items():
            if v["act"] != act:
                continue
            style = "-" if v["bn"] else "--"
            ax.plot(
                l,
                v["mean_norm"],
                style,
                color=_COLORS[v["net"]],
                marker=".",
                markersize=4,
                label=f"{name} (rate {fmt(v['rate']['value'])})",
            )
            if v["predicted"]:
                # r(s) is the growth of the squared norm: the norm grows by sqrt(r(s)) per layer.
                anchor = np.sqrt(v["mean_sq"][fit[-1] - 1])
                ax.plot(
                    fit,
                    anchor * np.sqrt(v["r_s"]) ** (fit[-1] - fit),
                    ":",
                    color="k",
                    linewidth=1.2,
                    label=f"r(s) = {v['r_s']:.3f} (prediction)",
                )
            if with_gsc and v["gsc"]:
                lg = np.arange(cfg["depth"] + 1)
                axes[1, j].fill_between(
                    lg,
                    v["gsc"]["gsc_lo"],
                    v["gsc"]["gsc_hi"],
                    color=_COLORS[v["net"]],
                    alpha=0.12,
                    linewidth=0,
                )
                axes[1, j].plot(lg, v["gsc"]["gsc"], style, color=_COLORS[v["net"]], label=name)
        ax.set_title(
            f"{act}: mean ||dE/dW_l|| over {cfg['repeats']:,} repeats; r(s) = {R_S[act]:.3f}",
            fontsize=10,
        )
        ax.set_xlabel("layer index l (input to output)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if with_gsc:
            axes[1, j].set_title(
                f"{act}: pooled GSC(l, 0), error <g, output> (band: 95% bootstrap)", fontsize=9
            )
            axes[1, j].set_xlabel("compositional depth l (output to input)")
            axes[1, j].set_yscale("log")
            axes[1, j].grid(alpha=0.3)
            axes[1, j].legend(fontsize=7)
    fig.suptitle(
        f"Forward/backward scaling: {cfg['depth']} weight layers x {cfg['width']}, batch "
        f"{cfg['batch']}, x ~ N(0, I), injected gradient ~ N(0, I/d) (solid: batch norm; "
        "dashed: none)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, paths)


def summary_md(results: dict[str, Any], info: dict[str, Any]) -> str:
    cfg, t = results["config"], info["timings"]
    fl = results["fit_layers"]
    lines = [
        "# Forward/backward scaling ('ghost' analysis)",
        "",
        f"gscfast {info['version']}: {len(cfg['variants'])} variants x {cfg['repeats']:,} repeats "
        f"(fresh network and data each); MLPs of {cfg['depth']} weight layers and width "
        f"{cfg['width']}, batch {cfg['batch']}; seed {cfg['seed']}.",
        "",
        "## Plain networks: measured rate beside r(s)",
        "",
        "| variant | init | measured rate | 95% CI over chunks | r(s) | measured / r(s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in results["variants"].items():
        if v["net"] == "plain":
            r = v["rate"]
            mark = "" if v["predicted"] else " (no prediction: no batch norm)"
            lines.append(
                f"| {name} | {v['init']} | {fmt(r['value'], 4)} | [{fmt(r['ci95'][0], 4)}, "
                f"{fmt(r['ci95'][1], 4)}] | {v['r_s']:.3f}{mark} | "
                f"{fmt(r['value'] / v['r_s'], 3) if v['predicted'] else 'n/a'} |"
            )
    lines += [
        "",
        "## All variants",
        "",
        "| variant | measured rate | 95% CI | mean norm, layer 1 | layer L | "
        f"GSC({cfg['depth']}, 0) (gscfast) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in results["variants"].items():
        r, g = v["rate"], (v["gsc"] or {}).get("gsc")
        lines.append(
            f"| {name} | {fmt(r['value'], 4)} | [{fmt(r['ci95'][0], 4)}, "
            f"{fmt(r['ci95'][1], 4)}] | {sci(v['mean_norm'][0])} | {sci(v['mean_norm'][-1])} "
            f"| {sci(g[-1] if g else None)} |"
        )
    lines += [
        "",
        "## How the numbers are made",
        "",
        f"- Networks (`gscfast.experiments.ghost.ghost_net`): layer 1 `linear -> [batch norm] -> "
        f"activation`; layers 2..{cfg['depth'] - 1} the same (plain) or basic blocks "
        "`act(x + scale * BN(W2 act(BN(W1 x))))` (res: scale 1; res-sqrt: 1/sqrt(number of "
        f"blocks)); layer {cfg['depth']} a linear head. No biases; batch norm without affine "
        "parameters, with batch statistics. Weights N(0, c/fan_in): He (c = 2) for ReLU, Glorot "
        "(c = 1 for square layers) for tanh, LeCun (c = 1) for SELU; the head c = 1.",
        f"- Each repeat: fresh weights, a batch `x` of {cfg['batch']} rows ~ N(0, I), a gradient "
        f"`g` ~ N(0, I/{cfg['width']}) injected at the head's output (error `E = <g, output>`), "
        "and `||dE/dW_l||_F` for every weight matrix, by autograd.",
        "- **Measured rate**: `exp(-slope)` of the least-squares line through `log mean_l "
        f"||dE/dW_l||^2` over the hidden layers l = {fl[0]}..{fl[-1]} (the stem sees the raw "
        "input, the head has no norm or activation): the per-layer growth of the mean squared "
        "gradient norm towards the input. The interval is a Student-t 95% interval of the same "
        f"fit over the {results['variants'][next(iter(results['variants']))]['rate']['chunks']} "
        f"chunks of {cfg['chunk']} repeats.",
        "- **r(s)** = `E[s'(z)^2] / Var[s(z)]`, z ~ N(0, 1) (definitions.md): the predicted "
        "per-layer growth of the squared gradient norm in a plain linear -> batch-norm -> "
        "activation network, in the limit of infinite width and batch; a finite batch (batch "
        "norm's backward pass projects out the batch mean and scale directions) and width shift "
        "the measured rate by a few percent.",
        "- The figure plots the mean norm (not squared); the dotted line has the slope sqrt(r(s)) "
        "per layer, anchored at the plain batch-norm network's last fitted layer.",
        "- GSC(l, 0): the pooled expected GSC (definitions.md) of the first network of every "
        "chunk, error `<g, output>`: each job keeps `gscfast.gsc_moments` of its first network, and "
        "the chunks' datapoints are pooled (a ratio of expectations, not a mean of per-network "
        "GSCs: with batch statistics the batch is one datapoint, and a mean of ratios with one "
        "error draw in each denominator has no finite mean); the band is a 95% percentile "
        "bootstrap over the networks. gscfast ends a layer after each activation and after each residual block, "
        "so in a ResNet l counts blocks and the activations after them (as many layers as weight "
        f"layers, {cfg['depth']}).",
        "",
        *config_section(cfg),
        "## Timings",
        "",
        invocation_line(info),
        f"- All {t['jobs']} jobs: {t['job_seconds']:.1f} s of job time in total; per repeat "
        f"{1e3 * t['job_seconds'] / max(1, cfg['repeats'] * len(cfg['variants'])):.1f} ms on "
        "average.",
        "",
        f"Machine: {info['machine']}.",
        "",
        "## Files",
        "",
        "- `ghost.png`, `ghost.pdf`: mean weight-gradient norm per layer (top) and GSC (bottom).",
        "- `results.json`: every number (per variant: rate, interval, r(s), per-layer mean norm, "
        "mean squared norm and its standard error, pooled GSC with its band), the configuration and timings.",
        "- `layers.csv`: columns `variant, l, mean_norm, mean_sq, se_sq, gsc, gsc_lo, gsc_hi`.",
        "- `manifest.json`, `jobs/`: the run's identity and one record per (variant, chunk); "
        "`gscfast ghost --out DIR --resume` with the same options continues or regenerates.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(out: str | Path, config: dict[str, Any], result) -> dict[str, Path]:
    """results.json, layers.csv, ghost.png/pdf and summary.md from a complete run's records."""
    results = aggregate(config, result.records)
    files = [
        text_file("layers.csv", layers_csv(results)),
        figure_files("ghost", lambda paths: plot(results, paths)),
    ]
    return write_files(out, result, results, files, summary_md, extras=("timings",))


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variants",
        nargs="+",
        default=["all"],
        metavar="VARIANT",
        help=f"NET-ACT or NET-ACT-bn, NET in {', '.join(NETS)}, ACT in "
        f"{', '.join(ACTIVATIONS)}; or groups {', '.join(GROUPS)} (default: all 18)",
    )
    p.add_argument("--repeats", type=int, default=4096, help="networks per variant (default 4096)")
    p.add_argument("--chunk", type=int, default=256, help="repeats per job (default 256)")
    p.add_argument("--width", type=int, default=256, help="width d (default 256)")
    p.add_argument("--depth", type=int, default=20, help="weight layers (default 20)")
    p.add_argument("--batch", type=int, default=128, help="inputs per batch (default 128)")
    p.add_argument(
        "--no-gsc", action="store_true", help="skip gscfast's GSC of each chunk's first network"
    )
    add_study_arguments(p, NAME, device="cpu", backend="the GSC")


def main(args: argparse.Namespace) -> int:
    config = config_from_args(make_config, args, gsc=not args.no_gsc)

    def write(result) -> dict[str, Path]:
        paths = write_outputs(args.out, config, result)
        if not args.quiet:
            results = json.loads(paths["results.json"].read_text())
            print(f"{'variant':<18} {'rate':>7}  95% CI             r(s)")
            for name, v in results["variants"].items():
                r = v["rate"]
                print(
                    f"{name:<18} {fmt(r['value'], 4):>7}  [{fmt(r['ci95'][0], 4)}, "
                    f"{fmt(r['ci95'][1], 4)}]  {v['r_s']:.3f}{'' if v['predicted'] else ' (n/a)'}"
                )
        return paths

    return run_command(make_study(config), args, write)
