"""On a CUDA GPU (``pytest -m gpu``): every GPU backend against the reference backend.

Skipped without a GPU (``torch.cuda.is_available()`` is False); ``conftest.py`` says so.
"""

from __future__ import annotations

import pytest
import torch
from _gpu_cases import cases, check_backend, check_spans, fallback_cases, mixed_cases

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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", mixed_cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_spans_run_on_the_kernels(name, case, dtype):
    check_spans(_backend(name), case, dtype, device="cuda")


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


def _cnn() -> torch.nn.Module:
    """A CNN with every kind of feature-map rule the torch engine holds channels-last."""
    from torch import nn

    kw = dict(dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, **kw),
        nn.BatchNorm2d(4, **kw),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect", **kw),
        nn.GroupNorm(2, 4, **kw),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3, **kw),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cnn_on_cuda_equals_the_reference(name):
    """Convolutional models on CUDA (the fused backends hand them to the torch engine, which holds
    feature maps channels-last): every function equals the CPU reference in float64."""
    _backend(name)
    model = _cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5), generator=g)
    mc = _cnn().cuda()

    def results(m, dev, backend):
        xd, yd, ld = x.to(dev), y.to(dev), labels.to(dev)
        return {
            "gsc": gscfast.gsc(m, xd, yd, backend=backend),
            "gsc_kl": gscfast.gsc(m, xd, ld, error="kl", backend=backend),
            "gsc_matrix": gscfast.gsc_matrix(m, xd[0], yd[0], backend=backend),
            "jacobian": gscfast.jacobian(m, xd[0], backend=backend),
            "jacobian_inner": gscfast.jacobian(m, xd[1], start=3, end=2, backend=backend),
            "preact_std": gscfast.preactivation_stats(m, xd, backend=backend).std,
        }

    want, got = results(model, "cpu", "reference"), results(mc, "cuda", name)
    for key in want:
        assert got[key].device.type == "cuda", key
        torch.testing.assert_close(
            got[key].cpu(), want[key], rtol=1e-9, atol=1e-12, equal_nan=True, msg=key
        )


def test_autograd_jacobian_of_a_cnn_on_cuda_is_torchs():
    from gscfast import autograd as ga

    model = _cnn().cuda()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, device="cuda")
    want = torch.autograd.functional.jacobian(model, x)
    got = ga.jacobian(model, x)
    assert got.device.type == "cuda" and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
