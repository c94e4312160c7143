"""On a CUDA GPU (``pytest -m gpu``): every GPU backend against the reference backend.

Skipped without a GPU (``torch.cuda.is_available()`` is False); ``conftest.py`` says so.
"""

from __future__ import annotations

import pytest
import torch
from _gpu_cases import cases, check_backend, fallback_cases

import gscfast
from gscfast import backends

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["triton", "cupy", "torch"]
DTYPES = [torch.float64, torch.float32]


def _backend(name):
    b = backends._load(name)
    if isinstance(b, str):
        pytest.skip(b)
    return b()


@pytest.fixture(autouse=True)
def _ieee():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_backend_matches_reference(name, case, dtype):
    be = _backend(name)
    if name != "torch":
        assert be.fused(case.to(dtype, "cuda").problem())
    check_backend(be, case, dtype, device="cuda")


@pytest.mark.parametrize("case", fallback_cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_fallback(name, case):
    be = _backend(name)
    assert not be.fused(case.to(torch.float64, "cuda").problem())
    check_backend(be, case, torch.float64, device="cuda", methods=("sweep", "chain"))


@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_public_api(name):
    _backend(name)
    model = gscfast.mlp(6, 100, act="tanh", norm="layer", seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 100, generator=g, dtype=torch.float64)
    y = torch.randn(64, 100, generator=g, dtype=torch.float64)
    mc, xc, yc = model.cuda(), x.cuda(), y.cuda()
    ref = gscfast.gsc_matrix(model, x[:8], y[:8], backend="reference")
    got = gscfast.gsc_matrix(mc, xc[:8], yc[:8], backend=name)
    assert torch.allclose(got.cpu(), ref, rtol=1e-9, equal_nan=True)
    a = gscfast.analyze(mc, xc, yc, backend=name)
    b = gscfast.analyze(model, x, y, backend="torch")
    assert torch.allclose(a.gsc.cpu(), b.gsc, rtol=1e-9)
    assert torch.allclose(a.preact_std.cpu(), b.preact_std, rtol=1e-9, equal_nan=True)
    J = gscfast.jacobian(mc, xc[:4], backend=name)
    assert torch.allclose(
        J.cpu(), gscfast.jacobian(model, x[:4], backend="torch"), rtol=1e-9, atol=1e-12
    )


def test_tf32_is_close():
    _backend("triton")
    model = gscfast.mlp(10, 100, act="tanh", norm="layer", seed=0).cuda()
    x, y = torch.randn(256, 100, device="cuda"), torch.randn(256, 100, device="cuda")
    exact = gscfast.gsc(model, x, y, backend="triton")
    torch.set_float32_matmul_precision("high")
    tf32 = gscfast.gsc(model, x, y, backend="triton")
    assert torch.allclose(tf32, exact, rtol=2e-2)


def test_auto_is_triton_on_cuda():
    _backend("triton")
    assert backends.get_backend("auto", "cuda").name == "triton"
