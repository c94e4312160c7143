"""Turn a ``pytest bench/ --benchmark-json=FILE`` result into the markdown tables of
``bench/README.md``.

Usage: ``python bench/report.py FILE [> table.md]``.

Times are the best of the timed rounds (scaled to the full B for baselines timed on a subset:
see ``timed_B``). "x roof" is achieved GFLOP/s over the roof: the best sgemm rate of the machine
(the faster of numpy's OpenBLAS and torch, ``gscfast.machine.gemm_rate``), the better of the one
measured right before that benchmark and the one at the start of the session; "speedup" is this
row's time over gscfast's (``backend="auto"``) in the same group. The best peer of a group is its
fastest row that is not gscfast's (a baseline or a JAX peer). The machine line names the BLAS
kernels that ran (threadpoolctl) and the OpenBLAS variables, and the report warns when those
were set: they force slower kernels, so the roof would not be the machine's.

Peak memory: each benchmark records the RSS growth during its timed rounds (``peak_mem_mb``), but
in one long pytest process that is near zero once the warm-up call has touched its buffers, so
the tables report memory only from the fresh-process probes of ``test_memory.py``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

COLD_START_S = 15.0  # issue 13, item 4

TARGETS: dict[
    tuple[str, str | None], float | dict[str, float]
] = {  # (workload, baseline impl or None for the roof ratio): required factor
    ("W1", "autograd"): 1.5,
    ("W1", "best_peer"): 1.2,
    ("W1", None): {"plain": 0.70, "normalized": 0.60},  # issue 13: share of the roof
    ("W2", "pairs_jacrev"): 20.0,
    ("W2", "torch_chain"): 1.0,
    ("W2", "best_peer"): 1.2,
    ("W2", None): 0.85,
    ("W3", "vmap_jacrev"): 3.0,
    ("W3", "best_chunk"): 1.0,
    ("W3", "functional_per_sample"): 100.0,
    ("W3", "best_peer"): 1.2,
    ("W3", None): 0.85,
    ("W6", "autograd_fwd_bwd"): 1 / 1.5,  # issue 14: at most 1.5x one forward and backward
    ("W7", "best_chunk"): 1.0,  # issue 14: faster than vmap(jacrev) at its best chunk_size
    ("W8", "torch"): 1.0,  # issue 14: the kernels' spans beat the torch engine's path they replace
    ("W8", "autograd"): 1.0,
    ("W8J", "torch"): 1.0,
    ("W8J", "best_chunk"): 1.0,
    ("W8C", "torch"): 1.0,
    ("W8E", "torch"): 1.0,
}
PICKED = {"best_chunk", "best_peer"}  # targets against the best of several rows: name it


def _fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def rows(data: dict) -> list[dict]:
    out = []
    for b in data["benchmarks"]:
        ei = dict(b.get("extra_info", {}))
        ei.setdefault("time_s", b["stats"]["min"] * ei.get("time_scale", 1.0))
        ei["group"] = b.get("group") or ""
        ei["name"] = b["name"]
        ei["median_s"] = b["stats"]["median"] * ei.get("time_scale", 1.0)
        if "gflops" in ei and "sgemm_gflops" in ei:
            # The yardstick is the better of the session's sgemm and the one measured right
            # before this benchmark: a measurement deflated by noise (numba's worker threads
            # still spinning after a parallel region, say) must not inflate the ratio.
            ei["sgemm_ref"] = max(ei["sgemm_gflops"], ei.get("sgemm_session_gflops", 0.0))
            ei["sgemm_ratio"] = ei["gflops"] / ei["sgemm_ref"]
        out.append(ei)
    return out


# Rows that are gscfast besides its backends' names: "auto", W8's unbroken network, W6's compiled
# rules, W7's ``layers=`` (``benchlib.run_checked`` marks them ``gscfast``; results recorded before
# 2026-12-03 marked the last three as peers, so ``best_peer`` skips them by name too).
GSCFAST_ROWS = ("auto", "auto_mlp", "compiled", "layers")
# Rows that are neither gscfast nor a peer: a kernel's GEMMs alone (``gemmbound.py``), a bound.
BOUND_ROWS = ("gemm_bound",)


def best_peer(items: list[dict]) -> dict | None:
    """The fastest row that is not gscfast's (``extra_info["gscfast"]`` False), or None."""
    peers = [
        r
        for r in items
        if r.get("gscfast") is False and r.get("impl") not in (*GSCFAST_ROWS, *BOUND_ROWS)
    ]
    return min(peers, key=lambda r: r["time_s"]) if peers else None


def table(rs: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rs:
        if r.get("workload", "").startswith(("MEM", "COMPILE", "W5")):  # own tables
            continue
        groups[r["group"]].append(r)
    lines = []
    for g, items in groups.items():
        ref = next((r for r in items if r.get("impl") == "auto"), None)
        peer = best_peer(items)
        lines += [
            f"\n**{g}**\n",
            "| impl | time (s) | GFLOP/s | x roof | gscfast speedup | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(items, key=lambda r: r["time_s"]):
            sp = "" if ref is None else f"{r['time_s'] / ref['time_s']:.2f}x"
            note = []
            if r.get("impl") in BOUND_ROWS:
                note.append("a bound, not a peer: the fused kernel's GEMMs alone")
            if r is peer:
                note.append(
                    "**best peer**"
                    + (
                        ""
                        if ref is None
                        else f": gscfast {r['time_s'] / ref['time_s']:.2f}x faster"
                    )
                )
            if "compile_s" in r:
                note.append(f"compile {r['compile_s']:.2f} s, not timed")
            if "auto_runs" in r:
                note.append(f"auto runs {r['auto_runs']}")
            if "timed_B" in r:
                note.append(f"timed on B={r['timed_B']}, scaled")
            if "dtype" in r:
                note.append(r["dtype"])
            if "epoch_s" in r:
                note.append(
                    f"{r['time_s'] / r['epoch_s']:.2f} training epochs' time "
                    f"(an epoch: {r['epoch_s']:.1f} s)"
                )
            lines.append(
                f"| {r['impl']} | {_fmt_t(r['time_s'])} | {r.get('gflops', 0):.1f} | "
                f"{r.get('sgemm_ratio', 0):.2f} | {sp} | {'; '.join(note)} |"
            )
    return "\n".join(lines)


def scaling(rs: list[dict]) -> str:
    items = [r for r in rs if r.get("workload", "").startswith("W5")]
    if not items:
        return ""
    lines = [
        "| workload | axis | value | impl | time (s) | GFLOP | GFLOP/s | x roof |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(items, key=lambda r: (r["workload"], r["axis"], r["impl"], r[r["axis"]])):
        lines.append(
            f"| {r['workload']} | {r['axis']} | {r[r['axis']]} | {r['impl']} | "
            f"{_fmt_t(r['time_s'])} | {r['flops'] / 1e9:.3g} | {r.get('gflops', 0):.1f} | "
            f"{r.get('sgemm_ratio', 0):.2f} |"
        )
    return "\n".join(lines)


def memory(rs: list[dict]) -> str:
    items = [r for r in rs if r.get("workload", "").startswith("MEM")]
    if not items:
        return ""
    lines = [
        "| case | impl | B | inputs (MB) | peak above start (MB) | peak RSS of process (MB) |"
        " call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(items, key=lambda r: (r["workload"], r["impl"], r["B"])):
        lines.append(
            f"| {r['workload']} | {r['impl']} | {r['B']} | {r['inputs_mb']:.0f} | "
            f"{r['extra_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['call_s']:.2f} |"
        )
    return "\n".join(lines)


def compile_times(rs: list[dict]) -> str:
    items = [r for r in rs if r.get("workload") == "COMPILE"]
    lines = [
        f"- numba kernels, {r['cache']} cache: {r['seconds']:.1f} s (both dtypes, "
        "process start excluded)"
        for r in items
    ]
    lines += [
        f"- first result of `gscfast gaussian` (7 architectures, tiny), {r['cache']} cache: "
        f"{r['seconds']:.1f} s"
        + (f", of which compiling {r['compile']:.1f} s" if "compile" in r else "")
        + " (process start included)"
        for r in rs
        if r.get("workload") == "GAUSSIAN-FIRST"
    ]
    lines += [  # the peers compiled ahead of time: not in their timings
        f"- {r['group']}, {r['impl']}: {r['compile_s']:.2f} s (tracing and XLA compilation, "
        "not timed)"
        for r in rs
        if "compile_s" in r
    ]
    return "\n".join(lines)


def targets(rs: list[dict]) -> str:
    by = defaultdict(dict)
    for r in rs:
        w = r.get("workload")
        if w in ("W1", "W2", "W3", "W6", "W7", "W8", "W8J", "W8C", "W8E"):
            by[(w, r.get("arch"))][r["impl"]] = r
    lines = ["| workload | target | measured | met |", "|---|---|---|---|"]
    for (w, arch), impls in sorted(by.items()):
        g = impls.get("auto")
        if g is None:
            continue
        if w in ("W3", "W7", "W8J"):
            chunks = [r for k, r in impls.items() if k.startswith("vmap_jacrev")]
            if chunks:
                impls["best_chunk"] = min(chunks, key=lambda r: r["time_s"])
        peer = best_peer(list(impls.values()))
        if peer is not None:
            impls["best_peer"] = peer
        for (tw, base), need in TARGETS.items():
            if tw != w:
                continue
            if isinstance(need, dict):  # by architecture: with or without a norm layer
                normalized = arch.startswith(("layer-", "batch-"))
                need = need["normalized" if normalized else "plain"]
            if base is None:
                got = g.get("sgemm_ratio", 0.0)
                what = f">= {need:.2f} of the roof"
            elif base in impls and need < 1:  # a bound on the time: at most 1/need x base's
                got = g["time_s"] / impls[base]["time_s"]
                lines.append(
                    f"| {w} {arch} | <= {1 / need:g}x the time of {base} | {got:.2f}x | "
                    f"{'yes' if got <= 1 / need else 'NO'} |"
                )
                continue
            elif base in impls:
                got = impls[base]["time_s"] / g["time_s"]
                what = f">= {need:g}x faster than {base}" + (
                    f" ({impls[base]['impl']})" if base in PICKED else ""
                )
            else:
                continue
            lines.append(
                f"| {w} {arch} | {what} | {got:.2f}{'' if base is None else 'x'} | "
                f"{'yes' if got >= need else 'NO'} |"
            )
    for r in rs:  # issue 13, item 4: what a user waits for numba before the first result
        if r.get("workload") == "GAUSSIAN-FIRST" and "compile" in r:
            got = r["compile"]
            lines.append(
                f"| cold start | <= {COLD_START_S:g} s of compile before the first `gscfast "
                f"gaussian` result | {got:.1f} s | {'yes' if got <= COLD_START_S else 'NO'} |"
            )
    return "\n".join(lines)


def bounds(rs: list[dict]) -> str:
    """W1's gscfast rows against the sweep's GEMMs alone (``gemmbound.py``): the share of
    gscfast's time its GEMMs would take, and the roof ratio those GEMMs reach."""
    bound = next((r for r in rs if r.get("workload") == "W1-BOUND"), None)
    if bound is None:
        return ""
    lines = [
        f"W1's GEMMs alone: {bound['time_s'] * 1e3:.1f} ms, {bound['sgemm_ratio']:.2f} of the "
        f"roof (tiles of {bound.get('tile', '?')} samples, {bound.get('gemm', 'openblas')}'s "
        "GEMM).\n",
        "| architecture | gscfast (s) | x roof | GEMMs alone / gscfast |",
        "|---|---|---|---|",
    ]
    for r in rs:
        if r.get("workload") == "W1" and r.get("impl") == "auto":
            lines.append(
                f"| {r.get('arch')} | {_fmt_t(r['time_s'])} | {r.get('sgemm_ratio', 0):.2f} | "
                f"{bound['time_s'] / r['time_s']:.2f} |"
            )
    return "\n".join(lines)


def machine(data: dict, rs: list[dict]) -> str:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    sg = [r["sgemm_gflops"] for r in rs if "sgemm_gflops" in r]
    sg += [r["sgemm_session_gflops"] for r in rs if "sgemm_session_gflops" in r]
    s = f"{cpu.get('brand_raw', mi.get('processor', '?'))}, {cpu.get('count', '?')} cores; "
    s += f"python {mi.get('python_version', '?')}; run {data.get('datetime', '?')}"
    if sg:
        libs = sorted({r["sgemm_library"] for r in rs if "sgemm_library" in r})
        s += f"; roof (best sgemm) {min(sg):.0f}-{max(sg):.0f} GFLOP/s (measured before each "
        s += f"benchmark{', reached by ' + '/'.join(libs) if libs else ''})"
    pk = [r["fma_peak_gflops"] for r in rs if "fma_peak_gflops" in r]
    if pk:
        s += f"; FMA peak {min(pk):.0f}-{max(pk):.0f} GFLOP/s (float32, what no GEMM exceeds)"
    blas = mi.get("blas") or next((r["blas"] for r in rs if "blas" in r), None)
    if blas:
        s += "; BLAS: " + ", ".join(
            " ".join(
                str(b[k])
                for k in ("owner", "internal_api", "version", "architecture", "threading_layer")
                if b.get(k)
            )
            + f" x{b['num_threads']}"
            for b in blas
        )
    env = openblas_env(data, rs)
    if env is not None:
        s += "; " + ", ".join(f"{k}={v}" if v is not None else f"{k} unset" for k, v in env.items())
    return s


def openblas_env(data: dict, rs: list[dict]) -> dict | None:
    """The OpenBLAS variables during the run (every benchmark records them), or None where the
    run predates that record. A variable set in any benchmark counts as set."""
    envs = [data.get("machine_info", {}).get("openblas_env")]
    envs += [r.get("openblas_env") for r in rs]
    envs = [e for e in envs if e]
    if not envs:
        return None
    return {k: next((e[k] for e in envs if e.get(k) is not None), None) for k in envs[0]}


def warning(data: dict, rs: list[dict]) -> str:
    """A loud line when OpenBLAS variables were set during the timing run, else ""."""
    env = openblas_env(data, rs)
    set_ = {k: v for k, v in (env or {}).items() if v is not None}
    if not set_:
        return ""
    names = " and ".join(f"{k}={v}" for k, v in set_.items())
    return (
        f"> **WARNING: {names} {'was' if len(set_) == 1 else 'were'} set during the timing run.** OpenBLAS ran the kernels it "
        "forces, not the machine's best: numpy's sgemm, the roof and every time that calls "
        "OpenBLAS are not this machine's. Rerun with `env -u OPENBLAS_CORETYPE -u "
        "OPENBLAS_L2_SIZE` (bench/README.md).\n"
    )


def main(path: str) -> None:
    data = load(path)
    rs = rows(data)
    print(f"Machine: {machine(data, rs)}\n")
    warn = warning(data, rs)
    if warn:
        print(warn)
    print("### Targets\n")
    print(targets(rs))
    b = bounds(rs)
    if b:
        print("\n### W1 against its GEMMs alone\n")
        print(b)
    print("\n### Workloads\n")
    print(table(rs))
    print("\n### Scaling (W5)\n")
    print(scaling(rs))
    print("\n### Memory\n")
    print(memory(rs))
    print("\n### Compilation\n")
    print(compile_times(rs))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
