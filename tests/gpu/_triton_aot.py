"""Compile the Triton kernels ahead of time for sm_80 / sm_90 without a GPU (Triton's own ptxas).

Run in a fresh process with ``TRITON_INTERPRET=0`` (a process that interprets kernels cannot also
compile them): ``python tests/gpu/_triton_aot.py [--all]``. Prints one JSON object per compiled
variant: kernel, dtype, precision, arch, block sizes, shared memory, cubin size, or the error.
``--all`` compiles many more variants (see ``jobs``; tens of minutes).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gscfast.backends import triton_backend as tb
from gscfast.backends.lowering import Act, Norm

INTS = {"N", "DIN", "DOUT", "GROUP_ROWS", "ROWS", "R", "SVN", "SVR", "NS", "M"}
FLAGS = {
    "fwd": dict(
        HAS_BIAS=True,
        NORM=int(Norm.LAYER),
        HAS_GAMMA=True,
        HAS_BETA=True,
        ACT=int(Act.TANH),
        SAVE_DS=True,
        SAVE_LN=True,
        WRITE_SQ=True,
        STATS=True,
    ),
    "step": dict(HAS_DS=True, LN=True, HAS_GAMMA=True, STORE=True, WRITE_SQ=True),
    "contrib": dict(HAS_DS=True, LN=True, HAS_GAMMA=True),
}
SMEM = {80: 163 * 1024, 90: 227 * 1024}


def compile_one(kind, dtype, arch, prec, cfg, flags):
    k = tb.kernels()
    fn = {"fwd": k.layer_fwd_kernel, "step": k.chain_step_kernel, "contrib": k.contrib_step_kernel}[
        kind
    ]
    t = "fp32" if dtype == torch.float32 else "fp64"
    sig, consts = {}, {}
    for name in fn.arg_names:
        if name in cfg or name in flags or name == "PREC":
            sig[name] = "constexpr"
            consts[name] = cfg.get(name, flags.get(name, prec))
        elif name in INTS:
            sig[name] = "i64"
        else:
            sig[name] = f"*{t}"
    t0 = time.time()
    c = triton.compile(
        ASTSource(fn, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)},
    )
    return dict(
        shared=c.metadata.shared,
        cubin=len(c.asm["cubin"]),
        seconds=round(time.time() - t0, 2),
        fits=c.metadata.shared <= SMEM[arch],
    )


def jobs(full: bool):
    """Default: every activation x norm (cycled) in small tiles at sm_90, and each kernel at its
    width-100 production configuration in float64 for sm_80 and in TF32 for sm_90 (about 25 s).
    ``full``: every activation x norm x dtype, every production configuration at width 100 for
    fp32/TF32/fp64 and both archs, and every autotune configuration the pruning keeps at widths
    100 and 1024 (sm_90)."""
    small = dict(BM=16, BN=32, BK=16)
    for act in map(int, Act):
        for norm in map(int, (Norm.NONE, Norm.LAYER, Norm.DIAG)):  # Norm.BATCH: numba only
            for dtype in (torch.float32, torch.float64):
                if not full and (norm != act % 3 or (dtype == torch.float64) != bool(act % 2)):
                    continue
                flags = dict(FLAGS["fwd"], NORM=norm, ACT=act, SAVE_LN=norm == Norm.LAYER)
                yield "fwd", dtype, 90, "ieee", small, flags
    # width 1024: the forward's whole-row tiles are the largest
    yield "fwd", torch.float32, 90, "ieee", tb.fwd_config(1024, 1024, torch.float32), FLAGS["fwd"]
    yield "fwd", torch.float64, 80, "ieee", tb.fwd_config(1024, 1024, torch.float64), FLAGS["fwd"]
    for kind in ("fwd", "step", "contrib"):
        for dtype, prec, archs in (
            (torch.float64, "ieee", (80,)),
            (torch.float32, "tf32", (90,)),
            (torch.float32, "ieee", ()),
        ):
            if full:
                archs = (80, 90)
            cfg = (
                tb.fwd_config(100, 100, dtype)
                if kind == "fwd"
                else tb.step_config(100, 100, dtype, contrib=kind == "contrib")
            )
            for arch in archs:
                yield kind, dtype, arch, prec, cfg, FLAGS[kind]
    if not full:
        return
    for kind in ("fwd", "step", "contrib"):
        for dtype in (torch.float32, torch.float64):
            item = 8 if dtype == torch.float64 else 4
            for width in (100, 1024):
                base = tb.fwd_config(width, width, dtype) if kind == "fwd" else {}
                extra = {k: v for k, v in base.items() if k in ("BM", "BN")}
                # the configurations the autotuner may pick (after pruning) at this width
                for conf in tb.prune(
                    tb._configs(kind, dtype),
                    {"DIN": width, "DOUT": width},
                    kind=kind,
                    item=item,
                    smem=SMEM[90],
                    **extra,
                ):
                    cfg = {
                        **base,
                        **conf.kwargs,
                        "num_warps": conf.num_warps,
                        "num_stages": conf.num_stages,
                    }
                    yield kind, dtype, 90, "ieee", cfg, FLAGS[kind]


def autotune_records():
    """The autotuned wrappers build, and pruning keeps configurations at widths 16, 100, 1024."""
    for kind in ("fwd", "step", "contrib"):
        for dtype in (torch.float32, torch.float64):
            tb.autotuned(kind, dtype)
            item = 8 if dtype == torch.float64 else 4
            for w in (16, 100, 1024):
                extra = (
                    {k: v for k, v in tb.fwd_config(w, w, dtype).items() if k in ("BM", "BN")}
                    if kind == "fwd"
                    else {}
                )
                kept = tb.prune(
                    tb._configs(kind, dtype), {"DIN": w, "DOUT": w}, kind=kind, item=item, **extra
                )
                yield dict(
                    kind="autotune-" + kind,
                    dtype=str(dtype),
                    width=w,
                    kept=len(kept),
                    of=len(tb._configs(kind, dtype)),
                    fits=len(kept) > 0,
                )


def main(argv):
    ok = True
    for rec in autotune_records():
        ok &= rec["fits"]
        print(json.dumps(rec), flush=True)
    for kind, dtype, arch, prec, cfg, flags in jobs("--all" in argv):
        rec = dict(
            kind=kind, dtype=str(dtype), prec=prec, arch=arch, cfg={k: v for k, v in cfg.items()}
        )
        try:
            rec.update(compile_one(kind, dtype, arch, prec, cfg, flags))
            ok &= rec["fits"]
        except Exception as e:  # report every failure, not only the first
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            ok = False
        print(json.dumps(rec), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
