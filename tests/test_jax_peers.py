"""The JAX peers of the benchmark suite (``bench/jaxpeers.py``) agree with gscfast at tiny sizes,
to float32 tolerance, for every formulation: a wrong peer must not reach the timings. And the
benchmark files reach them only through ``benchlib.jax_peers``, which skips with a reason where
jax is missing (checked without jax too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import gscfast

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import benchlib  # noqa: E402


def test_bench_files_import_jax_only_through_jax_peers():
    for path in sorted(BENCH.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in ("jax", "jaxlib", "jaxpeers")]
            assert not bad, f"{path.name}:{node.lineno} imports {bad}: use benchlib.jax_peers()"


@pytest.fixture(scope="module")
def jaxpeers():
    pytest.importorskip("jax", reason=benchlib.JAX_MISSING)
    import jaxpeers

    return jaxpeers


@pytest.mark.parametrize("how", ["grad", "vjp"])
@pytest.mark.parametrize("arch", list(benchlib.ARCHS))
def test_w1_peers_agree(jaxpeers, arch, how):
    act, norm = benchlib.ARCHS[arch]
    model = benchlib.make_model(4, 13, act, norm, seed=1)
    x, y = benchlib.gaussian(40, 13, 13, seed=2)
    ref = gscfast.gsc(model, x, y, backend="torch")
    got = jaxpeers.w1(model, x, y, how).run()
    benchlib.assert_log_close(got, ref, 1e-4, f"jax {how} {arch}")


@pytest.mark.parametrize("how", ["fori", "scan"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_w2_peers_agree(jaxpeers, act, how):
    model = benchlib.make_model(4, 11, act, None, seed=1)
    x, y = benchlib.gaussian(6, 11, 11, seed=2)
    ref = gscfast.gsc_matrix(model, x, y, backend="torch")
    got = jaxpeers.w2(model, x, y, how).run()
    benchlib.assert_log_close(got, ref, 1e-4, f"jax {how} {act}")


@pytest.mark.parametrize("how", ["jacfwd", "jacrev"])
@pytest.mark.parametrize("norm", [None, "layer"])
def test_w3_peers_agree(jaxpeers, norm, how):
    model = benchlib.make_model(3, 11, "tanh", norm, seed=1, in_features=7)
    x, _ = benchlib.gaussian(6, 7, 11, seed=2)
    ref = gscfast.jacobian(model, x, backend="torch")
    got = jaxpeers.w3(model, x, how).run()
    benchlib.assert_rel_close(got, ref, 1e-5, f"jax {how} norm={norm}")


def test_peers_refuse_what_they_do_not_compute(jaxpeers):
    x, y = benchlib.gaussian(6, 11, 11)
    with pytest.raises(ValueError, match="norms"):
        jaxpeers.w2(benchlib.make_model(3, 11, "tanh", "layer"), x, y, "fori")
    with pytest.raises(ValueError, match="couples the batch"):
        jaxpeers.w3(benchlib.make_model(3, 11, "tanh", "batch"), x, "jacfwd")
    with pytest.raises(ValueError, match="how must be"):
        jaxpeers.w1(benchlib.make_model(3, 11, "tanh", None), x, y, "jvp")
    with pytest.raises(ValueError, match="does not start with nn.Linear"):
        jaxpeers.convert(gscfast.mlp(3, 11, act="tanh", residual=0.5))
