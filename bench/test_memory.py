"""Peak memory (each case in a fresh process): W1, W2 and a CNN's ``gsc`` at growing B stay
under a bound set by the chunking, and ``gsc`` over 50,000 CIFAR-sized inputs (3072 features, 51 layers of width
100, kl error) runs in under 2 GB for the whole process, inputs included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from benchlib import BACKENDS, SIZES

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ["torch"] + [b for b in BACKENDS if b != "torch"]


def probe(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "memprobe.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(benchmark, info: dict, *args) -> dict:
    res = {}
    benchmark.pedantic(lambda: res.update(probe(*args)), rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(res)
    return res


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["w1", "w2", "cnn"])
@pytest.mark.parametrize("i", [0, 1])
def test_memory_vs_B(benchmark, kind, i, impl):
    s = SIZES["mem_" + kind]
    B = s["Bs"][i]
    if kind == "cnn" and impl != "torch":
        pytest.skip("CNNs run on the torch engine whatever the backend")
    benchmark.group = f"memory {kind.upper()} vs B"
    _run(
        benchmark,
        dict(workload="MEM-" + kind.upper(), impl=impl, B=B, depth=s["depth"], width=s["width"]),
        kind,
        impl,
        B,
        s["depth"],
        s["width"],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_cifar(benchmark, impl):
    s = SIZES["cifar"]
    benchmark.group = "memory CIFAR-sized gsc"
    res = _run(
        benchmark,
        dict(
            workload="MEM-CIFAR",
            impl=impl,
            B=s["B"],
            depth=s["depth"],
            width=s["width"],
            n_in=s["n"],
        ),
        "cifar",
        impl,
        s["B"],
        s["depth"],
        s["width"],
        s["n"],
        s["classes"],
    )
    assert res["peak_rss_mb"] < 2048, f"peak RSS {res['peak_rss_mb']:.0f} MB >= 2 GB"
