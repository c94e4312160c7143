"""The Gaussian-noise study: Figure 1 of Philipp, Song & Carbonell (2018) at the paper's scale.

Seven 50-layer MLPs of width 100 (``linear -> [norm] -> activation``, no bias, non-learnable
norms; weight variance 2/100 for ReLU nets, 1/100 otherwise) on 100 independent datasets of
10,000 Gaussian points each, a fresh network per dataset. Per layer: the expected GSC(l, 0),
the pre-activation standard deviation and the sign diversity; per architecture: the explosion
rate with a 95% confidence interval beside r(s) of definitions.md.

One job is one (architecture, dataset) pair; ``gscfast.experiments.runner`` runs and stores them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..estimators import GSCMoments, pooled_summary
from ..io import cache_dir
from ..machine import gemm_rate
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
    invocation_line,
    pyplot,
    run_command,
    run_timings,
    save_figure,
    t_interval,
    text_file,
    write_files,
)
from .outputs import (
    fmt as _fmt,
)
from .outputs import (
    num as _num,
)
from .outputs import (
    resolve_device as _device,
)
from .outputs import (
    resolve_dtype as _dtype,
)
from .outputs import (
    sci as _sci,
)
from .runner import (
    Job,
    OutdatedRecord,
    Study,
    job_seed,
)

__all__ = [
    "ARCHS",
    "PAPER_ARCHS",
    "add_arguments",
    "aggregate",
    "expand_archs",
    "main",
    "make_config",
    "make_dataset",
    "make_model",
    "make_study",
    "parse_arch",
    "run_job",
    "write_outputs",
]

NAME = "gaussian"
HELP = "Figure 1 of Philipp et al. (2018): GSC, pre-activation std and sign diversity on Gaussian noise"

# The paper's seven architectures: name -> (activation, norm).
ARCHS: dict[str, tuple[str, str | None]] = {
    "ReLU": ("relu", None),
    "layer-ReLU": ("relu", "layer"),
    "batch-ReLU": ("relu", "batch"),
    "tanh": ("tanh", None),
    "layer-tanh": ("tanh", "layer"),
    "batch-tanh": ("tanh", "batch"),
    "SeLU": ("selu", None),
}
PAPER_ARCHS = list(ARCHS)
# Prefixes for the optional variants (combinable, in this order): orthogonal initialization;
# residual blocks x + body(x) with branch scale 1 ("res-") or 1/sqrt(L) ("res-sqrt-").
PREFIXES = ("orth-", "res-sqrt-", "res-")
# Groups accepted by --archs.
GROUPS: dict[str, list[str]] = {
    "paper": PAPER_ARCHS,
    "resnet": [f"res-{a}" for a in ARCHS] + [f"res-sqrt-{a}" for a in ARCHS],
    "orth": [f"orth-{a}" for a in ARCHS],
}
GROUPS["all"] = GROUPS["paper"] + GROUPS["resnet"] + GROUPS["orth"]


# ----------------------------------------------------------------------------- architectures
def parse_arch(name: str) -> dict[str, Any]:
    """Architecture name -> keyword arguments of ``gscfast.mlp`` (``act``, ``norm``, ``init``,
    ``residual``). Names are a paper name (``ARCHS``) with optional prefixes ``orth-`` then
    ``res-`` or ``res-sqrt-``, e.g. ``"orth-res-sqrt-batch-ReLU"``."""
    rest, init = name, "gaussian"
    residual: str | float | None = None
    if rest.startswith("orth-"):
        rest, init = rest[len("orth-") :], "orthogonal"
    if rest.startswith("res-sqrt-"):
        rest, residual = rest[len("res-sqrt-") :], "sqrt"
    elif rest.startswith("res-"):
        rest, residual = rest[len("res-") :], 1.0
    if rest not in ARCHS:
        raise ValueError(
            f"unknown architecture {name!r}: use one of {', '.join(ARCHS)}, optionally prefixed by "
            f"'orth-' and then 'res-' or 'res-sqrt-', or a group: {', '.join(GROUPS)}"
        )
    act, norm = ARCHS[rest]
    return {"act": act, "norm": norm, "init": init, "residual": residual}


def expand_archs(words: list[str]) -> list[str]:
    """``--archs`` words (names or groups) -> architecture names, without repeats, checked."""
    return expand_names(words, GROUPS, parse_arch)


def predicted_rate(name: str) -> float | None:
    """r(s) where definitions.md predicts the explosion rate: plain (non-residual)
    linear -> batch-norm -> activation networks. None elsewhere."""
    a = parse_arch(name)
    return R_S.get(a["act"]) if a["norm"] == "batch" and a["residual"] is None else None


# ----------------------------------------------------------------------------- one job
def make_dataset(
    seed: int,
    samples: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x`` and labels ``y``, each ``[samples, dim]`` with i.i.d. ``N(0, 1/100)``
    entries (the paper's scale for ``dim = 100``), each input row rescaled to length 10. Drawn in
    float64 on the CPU from ``seed``, so the data do not depend on dtype or device."""
    x, y = _draw_dataset(int(seed), int(samples), int(dim))
    # copies: the cached draw must stay as drawn whatever the caller does with its tensors
    return (
        x.to(device=device, dtype=dtype, copy=True),
        y.to(device=device, dtype=dtype, copy=True),
    )


@functools.lru_cache(maxsize=1)
def _draw_dataset(seed: int, samples: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_dataset``'s float64 draw. The last one is kept: ``make_study`` runs the jobs
    dataset-major, so the seven architectures of a dataset draw it once (drawing 2 x 10,000 x 100
    normals takes about 35 ms, 15% of a job)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, dim, generator=g, dtype=torch.float64) / 10
    x = x * (10 / x.norm(dim=1, keepdim=True))
    y = torch.randn(samples, dim, generator=g, dtype=torch.float64) / 10
    return x, y


def make_model(name: str, depth: int, width: int, seed: int, dtype: torch.dtype = torch.float32):
    """The network of architecture ``name``, seeded (``gscfast.mlp``)."""
    from .. import mlp

    return mlp(depth, width, **parse_arch(name), seed=int(seed), dtype=dtype)


def is_pairs(spec: dict[str, Any]) -> bool:
    """Whether ``spec`` is a ``--pairs`` job (else an (architecture, dataset) job)."""
    return spec.get("kind") == "pairs"


def run_job(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One job: a pairs job (``--pairs``, ``run_pairs_job``) or one (architecture, dataset) job."""
    if is_pairs(spec):
        return run_pairs_job(config, spec)
    return run_dataset_job(config, spec)


# Rademacher probes per layer for the sketched GSC(k, l) of batch-norm networks (relative standard
# deviation of each squared-norm estimate about sqrt(2 / probes), 18%).
PAIRS_PROBES = 64


def run_pairs_job(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """GSC(k, l) for every pair of layers of the network of dataset 0 on its first
    ``pairs_samples`` points (``gscfast.gsc_matrix``): exact for per-sample networks; sketched
    with seeded Rademacher probes where batch norm makes the subset one datapoint (its exact
    Jacobians would be ``(B d) x (B d)``)."""
    from .. import compile_model, gsc_matrix
    from ..backends import get_backend

    device, dtype = _device(config["device"]), _dtype(config["dtype"])
    x, y = make_dataset(
        spec["data_seed"], config["samples"], config["width"], dtype=dtype, device=device
    )
    n = config["pairs_samples"]
    model = make_model(spec["arch"], config["depth"], config["width"], spec["net_seed"], dtype).to(
        device
    )
    method = "sketch" if compile_model(model).couples_batch else "exact"
    gen = torch.Generator().manual_seed(job_seed(spec["net_seed"], "probes"))
    m = gsc_matrix(
        model,
        x[:n],
        y[:n],
        backend=config["backend"],
        method=method,
        probes=PAIRS_PROBES,
        generator=gen,
    ).to(torch.float64)
    return {
        "kind": "pairs",
        "method": method,
        "probes": PAIRS_PROBES if method == "sketch" else None,
        "matrix": [m[k, : k + 1].tolist() for k in range(m.shape[0])],
        "backend": get_backend(config["backend"], device).name,
        "device": str(device),
    }


def run_dataset_job(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One (architecture, dataset) job: seeded data and network, ``gscfast.analyze``, plain lists.
    ``moments`` keeps the raw expectations that the pooled GSC over datasets is made of."""
    from .. import analyze
    from ..backends import get_backend

    device, dtype = _device(config["device"]), _dtype(config["dtype"])
    x, y = make_dataset(
        spec["data_seed"], config["samples"], config["width"], dtype=dtype, device=device
    )
    model = make_model(spec["arch"], config["depth"], config["width"], spec["net_seed"], dtype).to(
        device
    )
    a = analyze(model, x, y, backend=config["backend"])
    assert a.moments is not None  # analyze keeps the moments behind its expected GSC
    return {
        "gsc": a.gsc.tolist(),
        "preact_std": a.preact_std.tolist(),
        "sign_diversity": a.sign_diversity.tolist(),
        "rate": float(a.rate),
        "moments": a.moments.to_dict(),
        "backend": get_backend(config["backend"], device).name,
        "device": str(device),
    }


def check_result(config: dict, spec: dict, result: dict) -> None:
    """Raises ``ValueError`` unless ``result`` looks like ``run_job``'s."""
    n = config["depth"] + 1
    if is_pairs(spec):
        rows = result.get("matrix")
        if not isinstance(rows, list) or len(rows) != n:
            raise ValueError(f"'matrix' is not the lower triangle of an {n} x {n} matrix")
        for k, row in enumerate(rows):
            check_numbers(row, f"'matrix'[{k}]", k + 1, finite=False)
        if result.get("method") not in ("exact", "sketch"):
            raise ValueError("'method' is not 'exact' or 'sketch'")
        return
    if "moments" not in result:
        raise OutdatedRecord(
            "this job record has no 'moments', the raw per-dataset expectations that the pooled "
            "expected GSC is computed from (records written before gscfast computed the pooled GSC "
            "lack them); recompute the run into a new --out, or delete this directory's jobs/ and "
            "manifest.json and run the same command again"
        )
    for key in ("gsc", "preact_std", "sign_diversity"):  # NaN where a layer has no pre-activation
        check_numbers(result.get(key), repr(key), n, finite=False)
    check_number(result.get("rate"), "'rate'", finite=False)
    m = GSCMoments.from_dict(result["moments"])
    if m.L + 1 != n:
        raise ValueError(f"'moments' has {m.L + 1} layers, not {n}")


# ----------------------------------------------------------------------------- the study
def make_config(
    *,
    archs: list[str] | None = None,
    datasets: int = 100,
    samples: int = 10_000,
    seed: int = 0,
    depth: int = 50,
    width: int = 100,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    pairs: bool = False,
    pairs_samples: int | None = None,
) -> dict[str, Any]:
    """The study's configuration (the paper's scale by default), checked."""
    archs = expand_archs(archs or PAPER_ARCHS)
    check_integers(
        ("datasets", datasets, 1), ("samples", samples, 1), ("depth", depth, 1), ("width", width, 1)
    )
    if samples < 2:
        raise ValueError("samples must be at least 2 (batch norm needs a batch)")
    if pairs_samples is None:
        pairs_samples = min(200, samples)
    if pairs and (
        isinstance(pairs_samples, bool)
        or not isinstance(pairs_samples, int)
        or not 2 <= pairs_samples <= samples
    ):
        raise ValueError(
            f"pairs-samples must be an integer in [2, samples = {samples}], got {pairs_samples!r}"
        )
    check_backend(backend)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return {
        "archs": archs,
        "datasets": datasets,
        "samples": samples,
        "seed": int(seed),
        "depth": depth,
        "width": width,
        "backend": backend,
        "device": device,
        "dtype": dtype,
        "pairs": bool(pairs),
        "pairs_samples": pairs_samples if pairs else None,
    }


def make_study(config: dict[str, Any]) -> Study:
    """Jobs ``<arch>.<dataset>``, dataset-major (so a process draws each dataset once for all
    architectures, ``make_dataset``). Dataset ``i`` is the same data for every architecture (seed
    from ``seed`` and ``i``); each job's network has its own seed (from ``seed``, the architecture
    and ``i``). The order changes no number (each job is seeded on its own)."""
    jobs = [
        Job(
            f"{arch}.{i:05d}",
            {
                "arch": arch,
                "dataset": i,
                "data_seed": job_seed(config["seed"], "data", i),
                "net_seed": job_seed(config["seed"], "net", arch, i),
            },
        )
        for i in range(config["datasets"])
        for arch in config["archs"]
    ]
    if config["pairs"]:  # GSC(k, l) of dataset 0's network on a subset of its points
        jobs += [
            Job(
                f"{arch}.pairs",
                {
                    "arch": arch,
                    "kind": "pairs",
                    "dataset": 0,
                    "data_seed": job_seed(config["seed"], "data", 0),
                    "net_seed": job_seed(config["seed"], "net", arch, 0),
                },
            )
            for arch in config["archs"]
        ]
    return Study(
        NAME,
        config,
        jobs,
        run_job,
        check_result,
        gpu=config["device"] != "cpu",
        prepare=compile_kernels,
    )


def compile_kernels(config: dict[str, Any], specs: list[dict[str, Any]]) -> str | None:
    """Before the first job: where the jobs run on the numba backend, compile the kernels they
    use side by side (``numba_backend.compile_ahead``; on a cold kernel cache the per-sample
    sweep and the batch-norm sweep take about 10 s each on this project's CPUs). Returns a
    line saying so when some kernel is not cached yet."""
    from .. import compile_model
    from ..backends import get_backend

    device = _device(config["device"])
    if device.type != "cpu":
        return None
    try:
        if get_backend(config["backend"], device).name != "numba":
            return None
    except (RuntimeError, ValueError):  # the first job says what is wrong with the backend
        return None
    from ..backends.numba_backend import compile_ahead, is_cached

    # which architectures couple the batch (their sweeps are whole-batch), asked of the compiler
    coupled = {
        a: compile_model(make_model(a, 1, 2, 0)).couples_batch
        for a in dict.fromkeys(s["arch"] for s in specs)
    }
    kernels = []  # in the order the jobs first call them
    for s in specs:
        if not is_pairs(s):
            kernels.append("coupled_sweep_kernel" if coupled[s["arch"]] else "sweep_kernel")
        elif not coupled[s["arch"]]:  # gsc_matrix of batch datapoints runs on the torch engine
            kernels.append("chain_kernel")
    kernels = list(dict.fromkeys(kernels))
    dtype = _dtype(config["dtype"])
    cold = [k for k in kernels if not is_cached(k, dtype)]
    ahead = compile_ahead(kernels, dtype)
    if not cold:
        return None
    return (
        f"numba compiles {', '.join(cold)} for this machine first (once: 10-20 s on 2 cores"
        f"{', side by side' if ahead else ''}; cached in {cache_dir() / 'numba'})"
    )


# ----------------------------------------------------------------------------- aggregation
QUANTITIES = ("gsc", "preact_std", "sign_diversity")
STATS = ("mean", "median", "q10", "q90")


def _layer_stats(a: np.ndarray) -> dict[str, list[float]]:
    """Per-layer mean, median and 10%/90% quantiles over datasets (rows) of ``a [D, L+1]``,
    ignoring NaN; all-NaN layers give NaN."""
    out = {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers
        out["mean"] = np.nanmean(a, axis=0)
        out["median"] = np.nanmedian(a, axis=0)
        out["q10"] = np.nanquantile(a, 0.1, axis=0)
        out["q90"] = np.nanquantile(a, 0.9, axis=0)
    return {k: [float(t) for t in v] for k, v in out.items()}


BOOTSTRAP_RESAMPLES = 2000


def aggregate(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number of the study from the job records: per architecture the pooled expected GSC
    with its bootstrap band and the explosion rate fitted to it (the headline), r(s), and beside
    them the per-dataset statistics (mean, median, quantiles, per-dataset rates) and each
    dataset's values."""
    archs: dict[str, Any] = {}
    for arch in config["archs"]:
        recs = sorted(
            (r for r in records.values() if r["spec"]["arch"] == arch and not is_pairs(r["spec"])),
            key=lambda r: r["spec"]["dataset"],
        )
        per = {q: np.array([r["result"][q] for r in recs], dtype=np.float64) for q in QUANTITIES}
        rates = np.array([r["result"]["rate"] for r in recs], dtype=np.float64)
        pooled = pooled_summary(
            [GSCMoments.from_dict(r["result"]["moments"]) for r in recs],
            seed=job_seed(config["seed"], "bootstrap", arch),
            resamples=BOOTSTRAP_RESAMPLES,
        )
        mean, low, high, sd = t_interval(rates)
        L = config["depth"]
        layers = {q: _layer_stats(per[q]) for q in QUANTITIES}
        archs[arch] = {
            **parse_arch(arch),
            "pooled": pooled,
            "rate": {"pooled": pooled["rate"], "ci95": pooled["rate_ci"]},
            "rate_per_dataset": {
                "mean": mean,
                "ci95": [low, high],
                "std": sd,
                "median": float(np.nanmedian(rates)) if len(rates) else math.nan,
                "n": int(np.isfinite(rates).sum()),
            },
            "predicted_rate": predicted_rate(arch),
            "r_s": R_S.get(parse_arch(arch)["act"]),
            "gsc_L": {
                "pooled": pooled["gsc"][L],
                "ci95": [pooled["gsc_lo"][L], pooled["gsc_hi"][L]],
                **{f"per_dataset_{k}": v[L] for k, v in layers["gsc"].items()},
            },
            "layers": layers,
            "datasets": [
                {
                    "dataset": r["spec"]["dataset"],
                    "data_seed": r["spec"]["data_seed"],
                    "net_seed": r["spec"]["net_seed"],
                    "rate": r["result"]["rate"],
                    **{q: r["result"][q] for q in QUANTITIES},
                    "moments": r["result"]["moments"],
                }
                for r in recs
            ],
        }
    out = {"study": NAME, "config": config, "archs": archs}
    if config["pairs"]:
        out["pairs"] = {
            arch: pairs_summary(records[f"{arch}.pairs"]["result"]) for arch in config["archs"]
        }
    return out


def pairs_summary(result: dict[str, Any]) -> dict[str, Any]:
    """A pairs job's matrix with how far GSC(k, l) is from GSC(k, 0) / GSC(l, 0) (the paper's
    near-multiplicativity): per pair ``1 <= l < k <= L`` the factor ``max(r, 1/r)`` of
    ``r = GSC(k, l) GSC(l, 0) / GSC(k, 0)``; its largest value, where, and its median."""
    rows = result["matrix"]

    def factor(k: int, l: int) -> float:
        # inf where the ratio is undefined (a GSC of 0) or not positive: the worst deviation
        num, den = rows[k][l] * rows[l][0], rows[k][0]
        r = num / den if den > 0 else math.nan
        return max(r, 1 / r) if r > 0 and math.isfinite(r) else math.inf

    pairs = [(k, l) for k in range(2, len(rows)) for l in range(1, k)]
    factors = [factor(k, l) for k, l in pairs]
    worst = max(range(len(pairs)), key=factors.__getitem__, default=None)
    return {
        "method": result["method"],
        "probes": result["probes"],
        "matrix": rows,
        "max_factor": 1.0 if worst is None else factors[worst],
        "max_at": None if worst is None else list(pairs[worst]),
        "median_factor": float(np.median(factors)) if factors else math.nan,
    }


# ----------------------------------------------------------------------------- outputs


def layers_csv(results: dict[str, Any]) -> str:
    """Long table: one row per (architecture, dataset or statistic, layer). ``pooled``,
    ``pooled_lo``, ``pooled_hi``: the pooled expected GSC and its 95% bootstrap band (GSC only)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arch", "dataset", "l", *QUANTITIES])
    for arch, a in results["archs"].items():
        for row, key in (("pooled", "gsc"), ("pooled_lo", "gsc_lo"), ("pooled_hi", "gsc_hi")):
            for l, g in enumerate(a["pooled"][key]):
                w.writerow([arch, row, l, _num(g), "", ""])
        for stat in STATS:
            cols = [a["layers"][q][stat] for q in QUANTITIES]
            for l, vals in enumerate(zip(*cols)):
                w.writerow([arch, stat, l, *map(_num, vals)])
        for d in a["datasets"]:
            for l, vals in enumerate(zip(*(d[q] for q in QUANTITIES))):
                w.writerow([arch, d["dataset"], l, *map(_num, vals)])
    return buf.getvalue()


_STYLE = {None: "-", "layer": "--", "batch": ":"}


def plot(results: dict[str, Any], paths: list[Path]) -> None:
    """Figure 1: GSC(l, 0) (log scale), pre-activation std and sign diversity against
    compositional depth; one line per architecture. Panel A: the pooled expected GSC over all
    datasets with its 95% bootstrap band; B and C: mean over datasets with a 10-90% band."""
    plt = pyplot()
    cfg = results["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = plt.get_cmap("tab10" if len(results["archs"]) <= 10 else "tab20").colors
    l = np.arange(cfg["depth"] + 1)
    titles = (
        "(A) expected GSC(l, 0), pooled over datasets",
        "(B) pre-activation standard deviation",
        "(C) sign diversity",
    )
    for i, (arch, a) in enumerate(results["archs"].items()):
        color = colors[i % len(colors)]
        style = "-." if a["residual"] is not None else _STYLE[a["norm"]]
        for ax, q in zip(axes, QUANTITIES):
            s = a["layers"][q]
            lo, hi, m = (np.array(s[k], dtype=float) for k in ("q10", "q90", "mean"))
            if q == "gsc":
                lo, hi, m = (
                    np.array(a["pooled"][k], dtype=float) for k in ("gsc_lo", "gsc_hi", "gsc")
                )
            ax.fill_between(l, lo, hi, color=color, alpha=0.15, linewidth=0)
            label = f"{arch} (rate {a['rate']['pooled']:.3f})" if q == "gsc" else None
            ax.plot(l, m, style, color=color, linewidth=1.6, label=label)
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("compositional depth l")
        ax.set_xlim(0, cfg["depth"])
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_ylim(0, 0.52)
    fig.suptitle(
        f"Gaussian noise: {cfg['depth']} layers x {cfg['width']}, {cfg['datasets']} datasets "
        f"x {cfg['samples']:,} points. A: pooled expected GSC, band 95% bootstrap interval over "
        "datasets; B, C: mean over datasets, band 10-90% of datasets",
        fontsize=10,
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False
    )
    rows = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    save_figure(fig, paths)


def pairs_csv(results: dict[str, Any]) -> str:
    """One row per (architecture, k, l) with ``k >= l``: GSC(k, l) of the ``--pairs`` matrix."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arch", "k", "l", "gsc"])
    for arch, p in results["pairs"].items():
        for k, row in enumerate(p["matrix"]):
            for l, v in enumerate(row):
                w.writerow([arch, k, l, _num(v)])
    return buf.getvalue()


def plot_pairs(results: dict[str, Any], paths: list[Path]) -> None:
    """One heatmap per architecture: log10 GSC(k, l) for every pair k >= l."""
    plt = pyplot()
    cfg, pairs = results["config"], results["pairs"]
    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.7 * rows), squeeze=False)
    for ax in axes.flat[len(pairs) :]:
        ax.axis("off")
    for ax, (arch, p) in zip(axes.flat, pairs.items()):
        n = len(p["matrix"])
        m = np.full((n, n), np.nan)
        for k, row in enumerate(p["matrix"]):
            m[k, : k + 1] = row
        with np.errstate(divide="ignore", invalid="ignore"):
            im = ax.imshow(np.log10(m), origin="lower", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="log10 GSC(k, l)")
        ax.set_title(f"{arch} ({p['method']}); max dev. x{_fmt(p['max_factor'])}", fontsize=9)
        ax.set_xlabel("l")
        ax.set_ylabel("k")
    fig.suptitle(
        f"GSC(k, l) for every pair k >= l: dataset 0's network on its first "
        f"{cfg['pairs_samples']:,} points (sketch: {PAIRS_PROBES} Rademacher probes)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, paths)


def job_flops(config: dict[str, Any]) -> float:
    """GEMM FLOPs of one job's forward and backward (input-gradient) passes: 2 x 2 B L d^2."""
    return 4.0 * config["samples"] * config["depth"] * config["width"] ** 2


def summary_md(results: dict[str, Any], run_info: dict[str, Any]) -> str:
    cfg = results["config"]
    L = cfg["depth"]
    lines = [
        "# Gaussian-noise study (Philipp, Song & Carbonell 2018, Figure 1)",
        "",
        f"gscfast {run_info['version']}: {len(cfg['archs'])} architectures x {cfg['datasets']} "
        f"datasets x {cfg['samples']:,} points; MLPs of depth {L} and width {cfg['width']}; "
        f"seed {cfg['seed']}.",
        "",
        "## Explosion rates",
        "",
        f"| architecture | rate | 95% CI | r(s) | GSC({L}, 0) | 95% CI | per-dataset rates: mean "
        f"[95% t-CI] | per-dataset GSC({L}, 0): median (10-90%) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch, a in results["archs"].items():
        r, g, rd = a["rate"], a["gsc_L"], a["rate_per_dataset"]
        lines.append(
            f"| {arch} | {_fmt(r['pooled'])} | [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}] "
            f"| {_fmt(a['predicted_rate'])} | {_sci(g['pooled'])} "
            f"| [{_sci(g['ci95'][0])}, {_sci(g['ci95'][1])}] "
            f"| {_fmt(rd['mean'])} [{_fmt(rd['ci95'][0])}, {_fmt(rd['ci95'][1])}] "
            f"| {_sci(g['per_dataset_median'])} ({_sci(g['per_dataset_q10'])} - "
            f"{_sci(g['per_dataset_q90'])}) |"
        )
    lines += [
        "",
        f"- **GSC(l, 0)** is the **pooled expected GSC** of definitions.md: the ratio of "
        "expectations `E||J_l^0||_qm^2 E||f_l||^2 / E[f_0^2]` over every datapoint of every "
        f"dataset (the {cfg['datasets']} datasets' datapoints together, each dataset with its own "
        "network). Each job record keeps the raw expectations it is made of (`moments`: the "
        "datapoint means of `||J_l^0||_F^2`, `||f_l||^2` and `f_0^2`, and the datapoint count), "
        "so any statistic can be recomputed from `jobs/` without rerunning.",
        "- **95% CI** of GSC and rate: percentile bootstrap over datasets "
        f"({BOOTSTRAP_RESAMPLES} resamples of the datasets with replacement, each pooled as above; "
        "seeded, so reproducible).",
        "- **rate**: `exp(slope)` of the least-squares fit of `log GSC(l, 0)` against "
        f"`l = 0..{L}` (`gscfast.explosion_rate`), fitted to the pooled curve.",
        "- **Why not the mean over datasets of each dataset's GSC**: a mean of ratios is not an "
        "expected GSC. With batch norm a whole dataset is one datapoint (definitions.md), so each "
        "dataset's GSC divides by a single draw of `f_0^2`, which is close to a chi-square "
        "variable with one degree of freedom: its reciprocal has no finite mean, and the mean "
        "over datasets is ruled by the dataset whose `f_0` happens to be closest to zero (it "
        "varies by orders of magnitude with the seed, or with the BLAS's rounding). The "
        "per-dataset values are still reported (the last two columns, `results.json`, "
        "`layers.csv`) as a description of the spread between datasets, not as an estimate.",
        "- **r(s)** = `E[s'(z)^2] / Var[s(z)]` (definitions.md). It predicts the per-layer growth "
        "of the squared gradient norm in a plain linear -> batch-norm -> activation network, and "
        "so the explosion rate of the batch-norm architectures (their layer outputs keep a "
        "constant norm, so the GSC grows like the squared gradient). It is shown only there: for "
        "the other architectures (no norm, layer norm, residual blocks) definitions.md makes no "
        "prediction, and their rates are compared with each other and with 1 (no explosion).",
        "",
        "## How the numbers are made",
        "",
        f"- Each dataset: {cfg['samples']:,} inputs and labels of dimension {cfg['width']} with "
        "i.i.d. N(0, 1/100) entries, inputs rescaled to length 10; error layer `<y, output>` "
        '(`error="dot"`). Dataset i is the same for every architecture; every (architecture, '
        "dataset) pair gets a fresh network. Seeds come from `--seed`, the architecture name and "
        "the dataset index by SHA-256, so the numbers do not depend on job order, engine or resume.",
        "- Networks: `gscfast.mlp(depth, width, act, norm, init, residual)`: linear (no bias) -> "
        "[non-learnable layer/batch norm] -> activation; weight variance 2/width for ReLU, "
        "1/width for tanh and SeLU. Batch norm uses batch statistics, so with batch norm a whole "
        "dataset is one datapoint (definitions.md): its error is `f_0 = sum_i <y_i, out_i>`, "
        "whose mean is zero, so the GSC does not scale with the dataset size (the paper's coupled "
        "form is kept).",
        "- Per (architecture, dataset): `gscfast.analyze` gives the raw expectations of the "
        "GSC, the pre-activation std and the sign diversity (one sweep).",
        "- Panels B and C (pre-activation std, sign diversity): each line is the arithmetic mean "
        "over datasets of the per-dataset values (statistics of one network each, not ratios), "
        "the band spans the 10% and 90% quantiles over datasets.",
        "- NaN (no pre-activation: l = 0, residual blocks) is empty in layers.csv and null in "
        "results.json.",
        "",
    ]
    if cfg["pairs"]:
        lines += [
            f"## GSC(k, l) for every pair of layers (`--pairs`, {cfg['pairs_samples']:,} points)",
            "",
            "| architecture | method | GSC(L, 0) on the subset | largest deviation of GSC(k, l) from "
            "GSC(k, 0) / GSC(l, 0) | at (k, l) | median deviation |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for arch, p in results["pairs"].items():
            lines.append(
                f"| {arch} | {p['method']} | {_sci(p['matrix'][-1][0])} | "
                f"x{_fmt(p['max_factor'])} | {tuple(p['max_at']) if p['max_at'] else 'n/a'} | "
                f"x{_fmt(p['median_factor'])} |"
            )
        lines += [
            "",
            "- `gscfast.gsc_matrix` on dataset 0's network and its first points: entry (k, l) is the "
            "expected GSC(k, l) over the subset's datapoints. Networks without batch statistics: "
            "exact (every J_k^l formed). Batch-norm networks: the subset is one datapoint whose "
            "Jacobians are (B d) x (B d), so every squared norm is estimated with "
            f"{PAIRS_PROBES} seeded Rademacher probes (unbiased; each estimate has a relative "
            f"standard deviation of about sqrt(2/{PAIRS_PROBES}) = "
            f"{math.sqrt(2 / PAIRS_PROBES):.0%}, which is part of the deviation shown); row "
            "l = 0 is exact.",
            "- The paper finds GSC(k, l) close to GSC(k, 0) / GSC(l, 0) (the gradient scale is "
            "nearly multiplicative). The deviation of a pair is the factor max(r, 1/r) of "
            "r = GSC(k, l) GSC(l, 0) / GSC(k, 0), over 1 <= l < k <= L. Heatmaps: `pairs.png`; "
            "values: `pairs.csv`.",
            "",
        ]
    lines += [
        *config_section(cfg),
        "## Timings",
        "",
    ]
    t = run_info["timings"]
    lines += [
        invocation_line(run_info),
        f"- All {t['jobs']} jobs: {t['job_seconds']:.1f} s of job time in total "
        f"(the run may have been split by --resume); backends {', '.join(t['backends'])}, devices "
        f"{', '.join(t['devices'])}, CPU threads per job {', '.join(map(str, t['threads']))}.",
        f"- FLOP floor: one job is {job_flops(cfg) / 1e9:.3g} GFLOP of GEMMs (forward and backward, "
        f"4 B L d^2); at the best GEMM rate measured here for [{cfg['samples']}, {cfg['width']}] x "
        f"[{cfg['width']}, {cfg['width']}] on {t['sgemm_device']} ({t['sgemm_gflops']:.3g} GFLOP/s "
        f"with {t['sgemm_library']}; the best of one numpy (OpenBLAS) call, one torch call and, "
        "on a CPU, single-threaded GEMMs on cache-resident row tiles, one per thread, as "
        "the numba kernels run them, in their tile sizes) "
        f"that is {t['floor_seconds'] * 1e3:.3g} ms per job, {t['floor_seconds'] * t['jobs']:.3g} s "
        "for the study.",
        "- A job's time includes drawing its data and network. The jobs run dataset-major and a "
        "process draws each dataset once, so the first architecture of each dataset (here "
        f"{cfg['archs'][0]}) also pays for drawing the dataset.",
    ]
    if max(len(t["backends"]), len(t["devices"]), len(t["threads"])) > 1:
        lines.append(
            "- **Warning**: the jobs ran with different backends, devices or thread "
            "counts (the run was resumed elsewhere), so the numbers may differ in the "
            "last bits from those of a single run."
        )
    lines += [
        "",
        "| architecture | seconds per job (mean) | min | max | x FLOP floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arch, s in t["per_arch"].items():
        lines.append(
            f"| {arch} | {s['mean']:.3f} | {s['min']:.3f} | {s['max']:.3f} "
            f"| {s['mean'] / t['floor_seconds']:.1f} |"
        )
    if t.get("pairs_seconds"):
        lines.append(
            "- `--pairs` jobs: "
            + ", ".join(f"{a} {v:.1f} s" for a, v in t["pairs_seconds"].items())
            + "."
        )
    lines += [
        "",
        f"Machine: {run_info['machine']}.",
        "",
        "## Files",
        "",
        "- `figure1.png`, `figure1.pdf`: the three panels.",
        "- `results.json`: every number (per architecture: the pooled GSC with its band "
        "(`pooled`), the rates, per-layer statistics over datasets, each dataset's values, "
        "raw expectations and seeds), the configuration and the timings.",
        "- `layers.csv`: columns `arch, dataset, l, gsc, preact_std, sign_diversity`; "
        "`dataset` is a dataset index, `pooled`, `pooled_lo`, `pooled_hi` (panel A's line "
        "and band; GSC only) or one of `mean, median, q10, q90` (statistics over datasets; "
        "panels B and C plot `mean`, `q10`, `q90`).",
        *(
            [
                "- `pairs.png`, `pairs.pdf`, `pairs.csv` (`--pairs`): GSC(k, l) for every pair, "
                "as heatmaps and as columns `arch, k, l, gsc`."
            ]
            if cfg["pairs"]
            else []
        ),
        "- `manifest.json`, `jobs/`: the run's identity and one record per (architecture, "
        "dataset); `gscfast gaussian --out DIR --resume` with the same options continues or "
        "regenerates these files.",
        "",
    ]
    return "\n".join(lines)


def _timings(config: dict, records: dict, result) -> dict[str, Any]:
    per_arch = {}
    for arch in config["archs"]:
        s = [
            r["seconds"]
            for r in records.values()
            if r["spec"]["arch"] == arch and not is_pairs(r["spec"])
        ]
        per_arch[arch] = {
            "mean": float(np.mean(s)),
            "min": float(np.min(s)),
            "max": float(np.max(s)),
        }
    device = _device(config["device"])
    # The floor divides by the best rate of a job's GEMM shape, however it is reached, on the
    # threads the jobs ran with; half a second per formulation, as this rate is noisy.
    timings = run_timings(result)
    gemm = gemm_rate(
        config["samples"],
        config["width"],
        config["width"],
        device=device,
        seconds=0.5,
        threads=max(timings["threads"]) if timings["threads"] else None,
    )
    rate = gemm.flops
    return {
        **timings,
        "per_arch": per_arch,
        "pairs_seconds": {
            r["spec"]["arch"]: r["seconds"] for r in records.values() if is_pairs(r["spec"])
        },
        "backends": sorted({r["result"]["backend"] for r in records.values()}),
        "sgemm_device": gemm.device,
        "sgemm_library": gemm.library,
        "sgemm_gflops": rate / 1e9,
        "floor_seconds": job_flops(config) / rate,
    }


def write_outputs(out: str | Path, config: dict[str, Any], result) -> dict[str, Path]:
    """results.json, layers.csv, figure1.png/pdf (with ``pairs``: pairs.csv, pairs.png/pdf) and
    summary.md from a complete run's records."""
    results = aggregate(config, result.records)
    files = [
        text_file("layers.csv", layers_csv(results)),
        figure_files("figure1", lambda paths: plot(results, paths)),
    ]
    if config["pairs"]:
        files += [
            text_file("pairs.csv", pairs_csv(results)),
            figure_files("pairs", lambda paths: plot_pairs(results, paths)),
        ]
    return write_files(
        out,
        result,
        results,
        files,
        summary_md,
        timings=_timings(config, result.records, result),
        extras=("timings", "seconds"),
    )


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--datasets", type=int, default=100, help="datasets per architecture (default 100)"
    )
    p.add_argument("--samples", type=int, default=10_000, help="points per dataset (default 10000)")
    p.add_argument(
        "--archs",
        nargs="+",
        default=["paper"],
        metavar="ARCH",
        help=f"architectures: {', '.join(ARCHS)}, optionally prefixed by 'orth-' "
        f"(orthogonal init) and then 'res-' or 'res-sqrt-' (residual blocks with "
        f"branch scale 1 or 1/sqrt(L)); or groups {', '.join(GROUPS)} "
        f"(default: paper, the seven above)",
    )
    p.add_argument(
        "--depth", type=int, default=50, help="layers (default 50; smaller for quick runs)"
    )
    p.add_argument(
        "--width",
        type=int,
        default=100,
        help="width, also the input and label dimension (default 100)",
    )
    p.add_argument(
        "--pairs",
        action="store_true",
        help="also GSC(k, l) for every pair of layers of each architecture (dataset 0's "
        "network on --pairs-samples points): pairs.png/.pdf, pairs.csv and the "
        "largest deviation from GSC(k, 0) / GSC(l, 0) in the summary",
    )
    p.add_argument(
        "--pairs-samples",
        type=int,
        default=None,
        help="points of dataset 0 for --pairs (default 200, at most --samples)",
    )
    add_study_arguments(p, NAME, backend="the sweeps")


def main(args: argparse.Namespace) -> int:
    config = config_from_args(make_config, args)

    def write(result) -> dict[str, Path]:
        paths = write_outputs(args.out, config, result)
        if not args.quiet:
            results = json.loads(paths["results.json"].read_text())
            print(f"{'architecture':<22} {'rate':>7}  95% CI            r(s)   GSC(L, 0) [95% CI]")
            for arch, a in results["archs"].items():
                r, ci, g = a["rate"], a["rate"]["ci95"], a["gsc_L"]
                print(
                    f"{arch:<22} {_fmt(r['pooled']):>7}  [{_fmt(ci[0])}, {_fmt(ci[1])}]  "
                    f"{_fmt(a['predicted_rate']):<6} {_sci(g['pooled'])} "
                    f"[{_sci(g['ci95'][0])}, {_sci(g['ci95'][1])}]"
                )
        return paths

    return run_command(make_study(config), args, write)
