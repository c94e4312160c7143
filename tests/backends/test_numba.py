"""The "numba" backend's four methods against the "torch" backend (and, at small sizes, the
"reference" backend) on fresh random problems.

float64 must agree to 1e-9 relative, float32 to 1e-4 in log space (against float64 results).
Widths are odd (37, 63) so tile edges are exercised, ``chunk_size`` is small so tiles and chunks
end mid-dataset, and every module kind the fused kernels cover appears, in per-sample, eval-mode
and frozen batch-norm problems. Problems the kernels do not cover (train-mode batch norm coupling
a batch, residual blocks) must take the torch path and give its numbers.

Every output buffer the backend allocates starts as NaN, so an entry a kernel never writes shows
up as a NaN-pattern mismatch.
"""

from __future__ import annotations

import copy
import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import gscfast
from gscfast.backends import get_backend
from gscfast.validation import Problem, make_problem

pytest.importorskip("numba")
from gscfast.backends import numba_backend
from gscfast.backends.numba_backend import NumbaBackend


@pytest.fixture(autouse=True)
def poisoned_workspaces(monkeypatch):
    """Every workspace and output starts as NaN, so a kernel that reads memory it never wrote
    fails every time instead of by chance (stale values from an earlier call)."""
    monkeypatch.setattr(numba_backend, "POISON", True)
    numba_backend.release_workspace()


DTYPES = [torch.float64, torch.float32]
ACTS = [
    "relu",
    "leaky_relu",
    "leaky_neg",
    "tanh",
    "sigmoid",
    "elu",
    "selu",
    "softplus",
    "gelu",
    "gelu_tanh",
    "identity",
]
NORMS = [None, "layer", "layer_affine", "bn_eval", "bn_frozen"]


# ----------------------------------------------------------------------------- problems


def _act(name: str) -> nn.Module:
    return {
        "leaky_relu": lambda: nn.LeakyReLU(0.07),
        "leaky_neg": lambda: nn.LeakyReLU(-0.3),  # derivative not recoverable from the output
        "elu": lambda: nn.ELU(0.8),
        "softplus": lambda: nn.Softplus(beta=1.5, threshold=3.0),  # both branches
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    }.get(name, lambda: gscfast.nn.ACTIVATIONS[name]())()


def _norm(kind: str | None, d: int, g: torch.Generator) -> list[nn.Module]:
    if kind is None:
        return []
    if kind.startswith("layer"):
        m = nn.LayerNorm(d, elementwise_affine=kind == "layer_affine")
        if kind == "layer_affine":
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
                m.bias.copy_(0.3 * torch.randn(d, generator=g))
        return [m]
    m = nn.BatchNorm1d(d, affine=True)
    with torch.no_grad():
        m.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
        m.bias.copy_(0.3 * torch.randn(d, generator=g))
        m.running_mean.copy_(0.3 * torch.randn(d, generator=g))
        m.running_var.copy_(0.5 + torch.rand(d, generator=g))
    if kind == "bn_eval":
        m.eval()
    return [m]


def make_model(
    act: str,
    norm: str | None,
    widths=(11, 37, 63, 37, 5),
    seed: int = 0,
    bias: bool = True,
    last_linear: bool = True,
) -> nn.Sequential:
    """``widths[0]`` inputs, hidden layers ``Linear -> norm -> act``, a final plain Linear."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    dims = list(widths)
    hidden = dims[1:-1] if last_linear else dims[1:]
    d = dims[0]
    for out in hidden:
        lin = nn.Linear(d, out, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out, d, generator=g) * math.sqrt(1.5 / d))
            if bias:
                lin.bias.copy_(0.2 * torch.randn(out, generator=g))
        layers += [lin, *_norm(norm, out, g), _act(act)]
        d = out
    if last_linear:
        lin = nn.Linear(d, dims[-1], bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(dims[-1], d, generator=g) / math.sqrt(d))
        layers.append(lin)
    return nn.Sequential(*layers).double()


def perturbed(model: nn.Module, seed: int, eps: float = 0.3) -> nn.Module:
    """The same architecture with weights moved (a 'trained' model)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(eps * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def problem(model, dtype, *, D=2, B=13, error="dot", chunk=5, seed=1, batchnorm=None):
    model = copy.deepcopy(model).to(dtype)
    g = torch.Generator().manual_seed(seed)
    n = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    out = gscfast.compile_model(model).widths(n)[1]
    x = torch.randn(D, B, n, generator=g, dtype=torch.float64).to(dtype)
    y = (
        torch.randn(D, B, out, generator=g, dtype=torch.float64).to(dtype)
        if error == "dot"
        else torch.randint(0, out, (D, B), generator=g)
    )
    bn = batchnorm or ("frozen" if gscfast.compile_model(model).couples_batch else "batch")
    pb, _ = make_problem(model, x, y, error=error, batchnorm=bn, chunk_size=chunk)
    return pb


def as64(pb: Problem) -> Problem:
    """The same problem in float64 (the truth for float32 results)."""
    model = copy.deepcopy(pb.program.model).double()
    pb64, _ = make_problem(
        model,
        pb.x.double(),
        pb.y.double() if pb.error == "dot" else pb.y,
        error=pb.error,
        batchnorm="frozen" if pb.frozen else "batch",
        chunk_size=pb.chunk_size,
    )
    return pb64


# ----------------------------------------------------------------------------- comparisons


def assert_agree(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Same shape and NaN pattern; 1e-9 relative (float64) or 1e-4 in log space (float32)."""
    assert got.shape == ref.shape, f"{what}: {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert got.dtype == dtype, what
    got, ref = got.double(), ref.double()
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN patterns differ\n{got}\n{ref}"
    fin = ~ref.isnan()
    g, r = got[fin], ref[fin]
    if not r.numel():
        return
    if dtype == torch.float64:
        scale = r.abs().max().clamp(min=1e-300)
        bad = (g - r).abs() > 1e-9 * r.abs() + 1e-13 * scale
        assert not bad.any(), f"{what}: max rel. error {((g - r).abs() / r.abs()).max():.3g}"
    elif what.startswith("jacobian"):
        # signed entries with cancellation: relative to each datapoint's largest entry
        scale = ref.abs().flatten(1).max(1).values.clamp(min=1e-30)[:, None, None]
        err = ((got - ref).abs() / scale).max()
        assert err <= 1e-4, f"{what}: error {err:.3g} of the largest entry"
    else:
        big = r.abs() > 1e-5 * r.abs().max()
        assert torch.equal(torch.sign(g[big]), torch.sign(r[big])), what
        err = (g[big].abs().log() - r[big].abs().log()).abs().max()
        assert err <= 1e-4, f"{what}: log error {err:.3g}"
        small = ~big
        assert ((g[small] - r[small]).abs() <= 1e-4 * r.abs().max()).all(), what


def run_all(
    be, pb: Problem, init=None, probes=None, spans=((None, None),), only_sweep=False
) -> dict[str, torch.Tensor]:
    """Every raw quantity of a backend on ``pb`` (the sweep's only, if ``only_sweep``)."""
    L = pb.L
    sw = be.sweep(pb, grads=True, stats=True)
    out = {"sq_out": sw.sq_out, "sq_grad": sw.sq_grad, "chain": be.chain(pb, None)}
    # statistics without gradients too: nothing is saved for a backward pass then, a separate
    # code path (as preactivation_stats takes it)
    for tag, moments in (
        ("", sw.moments),
        ("nograd ", be.sweep(pb, grads=False, stats=True).moments),
    ):
        for l, mo in enumerate(moments):
            if mo is not None:
                out[f"{tag}mean[{l}]"] = mo.mean.to(pb.x.dtype)
                out[f"{tag}var[{l}]"] = (mo.m2 / mo.count).to(pb.x.dtype)
                out[f"{tag}signs[{l}]"] = torch.stack([mo.pos, mo.neg]).to(pb.x.dtype)
                out[f"{tag}count[{l}]"] = torch.tensor([float(mo.count)], dtype=pb.x.dtype)
    out["sq_out_nograd"] = be.sweep(pb, grads=False, stats=False).sq_out
    if only_sweep:
        return out
    if probes is not None:
        out["sketch"] = be.chain(pb, probes)
    if not pb.coupled:
        for s, e in spans:
            s = L + 1 if s is None else s
            e = 1 if e is None else e
            out[f"jacobian({s},{e})"] = be.jacobian(pb, s, e)
    if init is not None:
        out["contributions"] = be.contributions(pb, init)
    return out


def compare(
    pb: Problem, init=None, probes=None, spans=((None, None),), against="torch", only_sweep=False
):
    numba = NumbaBackend()
    ref_pb = pb if pb.x.dtype == torch.float64 else as64(pb)
    ref_init = None
    if init is not None:
        ref_init = (
            gscfast.compile_model(copy.deepcopy(init.model).double())
            if pb.x.dtype != torch.float64
            else init
        )
    got = run_all(numba, pb, init, probes, spans, only_sweep)
    ref = run_all(get_backend(against, "cpu"), ref_pb, ref_init, probes, spans, only_sweep)
    assert got.keys() == ref.keys()
    for k in got:
        base = k.removeprefix("nograd ")
        if base.startswith("mean[") and pb.x.dtype == torch.float32:
            # a mean may sit near zero: compare on the scale of the neuron's spread
            scale = ref[k.replace("mean", "var")].sqrt() + ref[k].abs()
            assert ((got[k].double() - ref[k]).abs() <= 1e-4 * scale).all(), k
        elif base.startswith("signs[") or base.startswith("count["):
            torch.testing.assert_close(got[k].double(), ref[k].double(), rtol=0, atol=0, msg=k)
        else:
            assert_agree(got[k], ref[k], pb.x.dtype, k)


def probe_fn(pb: Problem, R: int = 7):
    def probes(l: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + l)
        return (torch.randint(0, 2, (R, pb.S, pb.widths[l]), generator=g) * 2 - 1).double()

    return probes


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_all_methods_match_torch(act, norm, dtype):
    # zlib.crc32, not hash(): str hashes are salted per process, which made this test draw a
    # different model in every run (and fail at random where float32 rounding exceeded 1e-4)
    model = make_model(act, norm, seed=zlib.crc32(f"{act}/{norm}".encode()) % 1000)
    pb = problem(model, dtype)
    assert NumbaBackend().fused(pb), "this problem should run on the fused kernels"
    L = pb.L
    init = gscfast.compile_model(perturbed(pb.program.model, seed=3))
    compare(
        pb,
        init=init,
        probes=probe_fn(pb),
        spans=((None, None), (L + 1, L), (L, 2), (3, 3), (L - 1, 1)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 4, None])
@pytest.mark.parametrize("error", ["dot", "kl"])
def test_chunks_errors_datasets(error, chunk, dtype):
    model = make_model("tanh", "layer", widths=(37, 63, 37, 63, 37, 9), seed=5)
    for D, B in ((1, 29), (3, 7)):
        pb = problem(model, dtype, D=D, B=B, error=error, chunk=chunk)
        init = gscfast.compile_model(perturbed(pb.program.model, seed=4))
        compare(pb, init=init, probes=probe_fn(pb, R=3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias_no_final_linear(dtype):
    model = make_model("selu", None, widths=(63, 37, 63, 37), bias=False, last_linear=False)
    pb = problem(model, dtype, D=1, B=41, chunk=None)
    compare(pb, init=gscfast.compile_model(perturbed(pb.program.model, seed=2)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("norm", [None, "layer_affine", "bn_eval", "bn_frozen"], ids=str)
def test_against_reference(act, norm, dtype):
    """Small sizes: the autograd ground truth."""
    pytest.importorskip("gscfast.backends.reference")
    model = make_model(act, norm, widths=(5, 7, 6, 3), seed=11)
    pb = problem(model, dtype, D=2, B=4, chunk=3)
    L = pb.L
    init = gscfast.compile_model(perturbed(pb.program.model, seed=7))
    compare(
        pb, init=init, probes=probe_fn(pb, R=3), spans=((None, None), (L, 2)), against="reference"
    )


def _coupled_model():
    return make_model("relu", "bn_frozen", widths=(5, 7, 6, 3), seed=2)  # train-mode batch norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("error", ["dot", "kl"])
@pytest.mark.parametrize("act", ["relu", "tanh", "selu", "gelu", "leaky_neg"])
def test_coupled_sweep_matches_torch(act, error, dtype):
    """Train-mode batch norm (batch datapoints): the fused sweep, several datasets, odd widths,
    tiles that end mid-batch; with a layer norm and a plain layer mixed in."""
    g = torch.Generator().manual_seed(9)
    model = make_model(act, "bn_frozen", widths=(11, 37, 63, 37, 5), seed=4)
    model = nn.Sequential(
        *model[:-1], nn.Linear(37, 37), nn.LayerNorm(37), _act(act), nn.Linear(37, 5)
    ).double()
    with torch.no_grad():
        model[-4].weight.copy_(torch.randn(37, 37, generator=g, dtype=torch.float64) / 6)
    pb = problem(model, dtype, D=3, B=29, error=error, batchnorm="batch")
    assert pb.coupled and NumbaBackend().fused(pb, method="sweep")
    compare(pb, only_sweep=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coupled_sweep_against_reference(dtype):
    pytest.importorskip("gscfast.backends.reference")
    pb = problem(_coupled_model(), dtype, D=2, B=5, batchnorm="batch")
    compare(pb, only_sweep=True, against="reference")


def _coupled_contrib_model(act: str, mix: str) -> nn.Module:
    """Train-mode affine batch norms (batch statistics); ``mix="eval"`` puts an eval-mode batch
    norm (running statistics, a diagonal scale) and a layer without a norm between them."""
    model = make_model(act, "bn_frozen", widths=(11, 37, 23, 37, 5), seed=6)
    if mix == "eval":
        model[4].eval()  # the second hidden layer's batch norm: running statistics
        g = torch.Generator().manual_seed(8)
        lin = nn.Linear(37, 37).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(37, 37, generator=g, dtype=torch.float64) / 6)
        model = nn.Sequential(*model[:-1], lin, _act(act), model[-1])
    return model


def _contrib_agree(pb: Problem, init, against: str) -> None:
    """The fused coupled contributions against ``against`` on the float64 problem."""
    assert pb.coupled and NumbaBackend().fused(pb, method="contributions", init=init)
    ref_pb = pb if pb.x.dtype == torch.float64 else as64(pb)
    ref_init = gscfast.compile_model(copy.deepcopy(init.model).double())
    got = NumbaBackend().contributions(pb, init)
    assert got.dtype == torch.float64  # its squares are summed so (Backend.contributions)
    ref = get_backend(against, "cpu").contributions(ref_pb, ref_init)
    assert_agree(got.to(pb.x.dtype), ref, pb.x.dtype, "contributions")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("mix", ["batch", "eval"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_coupled_contributions_match_torch(act, mix, chunk, dtype):
    """The fused coupled recursion (batch datapoints): batch-tanh and batch-ReLU, with an
    eval-mode batch norm and a plain layer mixed in or not, several datasets in chunks of 1, 2
    or all, tiles of samples that end mid-batch (B = 301 > the tile)."""
    model = _coupled_contrib_model(act, mix)
    pb = problem(model, dtype, D=3, B=301, error="kl", chunk=chunk, batchnorm="batch")
    _contrib_agree(pb, gscfast.compile_model(perturbed(pb.program.model, seed=5)), "torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coupled_contributions_in_tiles_smaller_than_a_sample(monkeypatch, dtype):
    """GEMM tiles of fewer rows than a sample's lambda-rows (one sample a tile, many tiles per
    thread, the workspace sized by the lambda-rows): each tile's output overwrites its samples'
    input in the one buffer (coupled_step_kernel), and no tile may see another's output."""
    monkeypatch.setattr(numba_backend, "ROWS", 4)  # 2 (float32) or 1 (float64) GEMM rows
    model = _coupled_contrib_model("tanh", "eval")
    pb = problem(model, dtype, D=2, B=29, error="kl", chunk=1, batchnorm="batch")
    _contrib_agree(pb, gscfast.compile_model(perturbed(pb.program.model, seed=5)), "torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["batch", "eval"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_coupled_contributions_against_reference(act, mix, dtype):
    """Small sizes: the autograd ground truth, with the dot error too."""
    pytest.importorskip("gscfast.backends.reference")
    model = _coupled_contrib_model(act, mix)
    for error in ("dot", "kl"):
        pb = problem(model, dtype, D=2, B=6, error=error, chunk=1, batchnorm="batch")
        _contrib_agree(pb, gscfast.compile_model(perturbed(pb.program.model, seed=5)), "reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", ["batch", "eval"])
def test_coupled_contributions_of_the_initial_model_are_zero(mix, dtype):
    """``model`` equal to ``init``: every ``lambda >= 1`` contribution is exactly 0 (the terms
    with a factor ``R_m = G_m - S_m = 0``), as the torch engine gives it."""
    pb = problem(_coupled_contrib_model("relu", mix), dtype, D=2, B=37, batchnorm="batch")
    got = NumbaBackend().contributions(pb, pb.program)
    assert torch.all(got[:, 2:, 1:].nan_to_num() == 0)
    ref = get_backend("torch", "cpu").contributions(pb, pb.program)
    assert_agree(got.to(dtype), ref, dtype, "contributions")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coupled_contributions_layer_norm_falls_back(dtype):
    """A layer norm's projection over the features is not in the coupled kernels: the torch
    engine's numbers, bit for bit."""
    model = _coupled_contrib_model("tanh", "batch")
    model = nn.Sequential(*model[:-1], nn.Linear(37, 37), nn.LayerNorm(37), nn.Tanh(), model[-1])
    pb = problem(model.double(), dtype, D=2, B=9, error="kl", batchnorm="batch")
    init = gscfast.compile_model(perturbed(pb.program.model, seed=5))
    assert pb.coupled and not NumbaBackend().fused(pb, method="contributions", init=init)
    got = NumbaBackend().contributions(pb, init)
    ref = get_backend("torch", "cpu").contributions(pb, init)
    torch.testing.assert_close(got, ref, equal_nan=True, rtol=0, atol=0)


def _residual_model():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(
        nn.Linear(5, 6),
        nn.Tanh(),
        gscfast.nn.Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU()), 0.5),
        nn.Linear(6, 3),
    ).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["coupled", "residual", "no_linear_first", "two_linears"])
def test_fallbacks_give_torch_numbers(case, dtype):
    if case == "coupled":
        pb = problem(_coupled_model(), dtype, batchnorm="batch", B=6)
        assert pb.coupled
    elif case == "residual":
        pb = problem(_residual_model(), dtype)
    elif case == "no_linear_first":
        pb = problem(nn.Sequential(nn.Tanh(), nn.Linear(5, 4)).double(), dtype)
    else:
        pb = problem(
            nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double(),
            dtype,
        )
    assert not NumbaBackend().fused(pb)
    assert NumbaBackend().fused(pb, method="sweep") == (case == "coupled")  # fused coupled sweep
    # and fused coupled contributions
    assert NumbaBackend().fused(pb, method="contributions") == (case == "coupled")
    init = gscfast.compile_model(perturbed(pb.program.model, seed=1))
    got = run_all(NumbaBackend(), pb, init, probe_fn(pb, R=2))
    ref = run_all(get_backend("torch", "cpu"), pb, init, probe_fn(pb, R=2))
    assert bool(NumbaBackend().spans(pb)) == (case != "coupled")
    for k in got:
        swept = k.removeprefix("nograd ").startswith(("sq_", "mean", "var", "signs", "count"))
        if case == "coupled" and swept:
            continue  # the sweep is fused: test_coupled_sweep_* compare it
        if case == "coupled" and k == "contributions":
            continue  # fused too: test_coupled_contributions_* compare it
        if case != "coupled":  # the kernels run the layers they take (spans:
            # tests/backends/test_spans.py compares them with the reference)
            rtol = 1e-12 if dtype == torch.float64 else 1e-4
            atol = rtol * 1e-3 * float(ref[k].nan_to_num().abs().max())
            torch.testing.assert_close(got[k], ref[k], equal_nan=True, rtol=rtol, atol=atol, msg=k)
            continue
        torch.testing.assert_close(got[k], ref[k], equal_nan=True, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_with_numba(dtype):
    model = gscfast.mlp(
        6,
        37,
        act="tanh",
        norm="layer",
        in_features=63,
        out_features=9,
        bias=True,
        seed=3,
        dtype=dtype,
    )
    x = torch.randn(2, 17, 63, dtype=dtype)
    y = torch.randn(2, 17, 9, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    for fn, kw in (
        (gscfast.gsc, {}),
        (gscfast.gsc_matrix, {}),
        (gscfast.gsc_matrix, {"method": "sketch", "probes": 5}),
    ):
        gen = {"generator": torch.Generator().manual_seed(0)} if "probes" in kw else {}
        a = fn(model, x, y, backend="numba", chunk_size=7, **kw, **gen)
        gen = {"generator": torch.Generator().manual_seed(0)} if "probes" in kw else {}
        b = fn(model, x, y, backend="torch", **kw, **gen)
        torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=f"{fn.__name__} {kw}")
    J = gscfast.jacobian(model, x, backend="numba")
    Jt = torch.func.vmap(torch.func.vmap(torch.func.jacrev(model)))(x)
    torch.testing.assert_close(J, Jt, **tol)
    init = gscfast.mlp(
        6,
        37,
        act="tanh",
        norm="layer",
        in_features=63,
        out_features=9,
        bias=True,
        seed=4,
        dtype=dtype,
    )
    da, pa = gscfast.effective_depth(model, init, x, y, backend="numba")
    db, pb_ = gscfast.effective_depth(model, init, x, y, backend="torch")
    assert da == db
    torch.testing.assert_close(pa, pb_, equal_nan=True, **tol)


def test_registry_and_availability():
    assert NumbaBackend.unavailable_reason() is None
    assert "numba" in gscfast.available_backends("cpu")
    assert not NumbaBackend.supports(torch.device("meta"))
    assert gscfast.available_backends("cpu")[0] == "numba"  # "auto" on CPU picks it


def test_blas_threads_restored():
    from gscfast.backends import numba_backend as nb

    with nb.single_threaded_blas():
        inside = [get() for _, get, _ in nb._blas()]
    after = [get() for _, get, _ in nb._blas()]
    assert all(n == 1 for n in inside)
    with nb.single_threaded_blas():
        pass
    assert [get() for _, get, _ in nb._blas()] == after


def test_tiles_follow_the_small_matrix_kernels(monkeypatch):
    """Where OpenBLAS runs products of up to 100^3 multiply-adds unpacked, tiles are cut to
    that many GEMM rows (the widest layer decides); else, or when one sample's rows alone are
    more, or the rows would be too few, tiles keep ROWS rows."""
    nb = numba_backend
    monkeypatch.setattr(nb, "_ROWS_SET", None)
    monkeypatch.setattr(nb, "own_gemm", lambda: False)  # the kernels on OpenBLAS (no AVX-512)
    monkeypatch.setattr(nb, "small_gemm_kernels", lambda: True)
    assert nb.tile_rows(100 * 100) == 100
    assert nb.tile_rows(63 * 37) == 10**6 // (63 * 37)
    assert nb.tile_rows(200 * 200) == nb.ROWS  # 25 rows: per-tile overheads win
    pb = problem(
        make_model("tanh", None, widths=(100, 100, 100)), torch.float32, D=1, B=5000, chunk=None
    )
    tile = NumbaBackend._tile
    assert tile(pb, 5000, 1, 4, 100 * 100) == 100
    assert tile(pb, 5000, 7, 4, 100 * 100) == 100 // 7
    assert tile(pb, 5000, 150, 4, 100 * 100) == max(1, nb.ROWS // 150)
    monkeypatch.setattr(nb, "small_gemm_kernels", lambda: False)
    assert nb.tile_rows(100 * 100) == nb.ROWS
    assert tile(pb, 5000, 1, 4, 100 * 100) == nb.ROWS


def test_tiles_of_the_own_gemm(monkeypatch):
    """Where the kernels run their own GEMM, tiles are OWN_GEMM_ROWS rows whatever OpenBLAS
    has, and ROWS where GSCFAST_NUMBA_ROWS is set."""
    nb = numba_backend
    monkeypatch.setattr(nb, "_ROWS_SET", None)
    monkeypatch.setattr(nb, "own_gemm", lambda: True)
    for small in (True, False):
        monkeypatch.setattr(nb, "small_gemm_kernels", lambda small=small: small)
        assert nb.tile_rows(100 * 100) == nb.OWN_GEMM_ROWS
        assert nb.openblas_rows(100 * 100) == (100 if small else nb.ROWS)
    pb = problem(
        make_model("tanh", None, widths=(100, 100, 100)), torch.float32, D=1, B=5000, chunk=None
    )
    assert NumbaBackend._tile(pb, 5000, 100, 4, 100 * 100) == nb.OWN_GEMM_ROWS // 100
    monkeypatch.setattr(nb, "_ROWS_SET", "512")
    assert nb.tile_rows(100 * 100) == nb.ROWS


def test_small_gemm_kernels_reads_the_blas_core():
    libs = numba_backend._blas()
    names = {core().decode().lower() for _, _, core in libs if core is not None}
    assert numba_backend.small_gemm_kernels() == (
        bool(libs) and bool(names) and names <= set(numba_backend._SMALL_GEMM_CORES)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_tiles_match_torch(monkeypatch, dtype):
    """Tiles cut for the small-matrix kernels or the own GEMM (forced here at 33 GEMM rows,
    whatever this machine's BLAS) give the torch backend's numbers: many tiles per thread, tile edges inside
    every dataset."""
    monkeypatch.setattr(numba_backend, "_ROWS_SET", None)
    monkeypatch.setattr(numba_backend, "small_gemm_kernels", lambda: True)
    monkeypatch.setattr(numba_backend, "SMALL_GEMM", 63 * 37 * 33)
    monkeypatch.setattr(numba_backend, "OWN_GEMM_ROWS", 33)  # where the kernels' own GEMM runs
    model = make_model("tanh", "layer_affine", seed=11)
    pb = problem(model, dtype, D=2, B=150, chunk=None)
    assert NumbaBackend._tile(pb, 150, 1, 4, 63 * 37) == 33
    L = pb.L
    compare(
        pb,
        init=gscfast.compile_model(perturbed(pb.program.model, seed=5)),
        probes=probe_fn(pb, R=3),
        spans=((None, None), (L, 2)),
    )


def test_numba_codes_are_the_lowering_codes():
    """The kernels' module-level codes (compile-time constants for numba) are the lowering's."""
    from gscfast.backends import _numba_kernels as k
    from gscfast.backends.lowering import Act, Norm

    for m in Act:
        assert getattr(k, f"A_{m.name}") == m, m
    for m in Norm:
        assert getattr(k, f"N_{m.name}") == m, m


def test_coupled_sweep_is_race_free():
    """Threads meet only at batch-norm layers; widths that change between layers must not let
    one thread's rows of a layer overlap another's of the next (they did once: wrong gradients
    in about one call in ten). Many repetitions on widths 11-37-63-37-37-5 agree exactly."""
    import numba

    if numba.get_num_threads() < 2:
        pytest.skip("one thread: no race to find")
    model = make_model("tanh", "bn_frozen", widths=(11, 37, 63, 37, 5), seed=4)
    model = nn.Sequential(*model[:-1], nn.Linear(37, 37), nn.LayerNorm(37), nn.Tanh(), model[-1])
    pb = problem(model.double(), torch.float64, D=3, B=29, batchnorm="batch")
    first = NumbaBackend().sweep(pb, grads=True, stats=False)
    for _ in range(20):
        again = NumbaBackend().sweep(pb, grads=True, stats=False)
        assert torch.equal(again.sq_grad, first.sq_grad)
        assert torch.equal(again.sq_out, first.sq_out)


def test_a_raising_worker_releases_the_others():
    """A worker that raises sets the launch's abort flag: workers waiting at a barrier return,
    and the error reaches the caller (instead of a hang)."""
    from numba import njit

    from gscfast.backends import _numba_kernels as k

    @njit(nogil=True)
    def worker(th, nth, sync, out):
        if th == 1:
            raise ValueError("worker 1 failed")
        if not k._barrier(sync, nth):
            out[th] = 1.0

    out = np.zeros(2)
    with pytest.raises(ValueError, match="worker 1 failed"):
        k.launch(worker, 2, out, sync=True)
    assert out[0] == 0.0  # worker 0 left its barrier without going on


@pytest.mark.parametrize("act", [nn.SELU(), nn.ELU(alpha=0.8)], ids=["selu", "elu"])
def test_saturated_exponential_derivatives_keep_float32_precision(act):
    """ELU's and SELU's derivative at very negative ``z`` is ``alpha exp(z)``, tiny. Computed as
    ``y + alpha`` from the rounded float32 output ``y`` (as the kernels once did), it cancels:
    at ``z = -10`` a relative error of about 1e-3 against float64. Each entry of the Jacobian of
    ``Linear (identity) -> act -> Linear (identity)`` is one derivative, so each must be as
    precise as float32 evaluates ``alpha exp(z)``."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), act, nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[2].weight.copy_(torch.eye(4))
    x = torch.tensor([[-12.0, -10.0, -6.0, 1.5], [-9.0, -3.0, -0.5, -14.0]])
    got = gscfast.jacobian(model, x, backend="numba").diagonal(dim1=-2, dim2=-1)
    m64 = copy.deepcopy(model).double()
    ref = gscfast.jacobian(m64, x.double(), backend="reference").diagonal(dim1=-2, dim2=-1)
    rel = ((got.double() - ref) / ref).abs().max()
    assert rel < 1e-6, (rel, got, ref)


def test_saturated_tanh_derivative_is_as_precise_as_torchs():
    """tanh's derivative comes from the saved output as ``1 - y^2`` (as torch's backward takes
    it), which amplifies the output's error by ``1 / (1 - y^2)`` near saturation: the kernels'
    float32 tanh must be as close to correctly rounded there as torch's, or a saturated unit's
    derivative is ten times further from float64 than torch's (the rational approximation alone:
    1e-4 at z = 3.5)."""
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(6))
        model[2].weight.copy_(torch.eye(6))
    # where the rational approximation's derivative was off most (1.1e-2 at z = 5.856-5.992,
    # torch's float32 tanh 1e-4 to 3e-3 there), and milder places
    x = torch.tensor(
        [[5.856, 5.992, -5.946, 5.898, 3.55, -2.5], [5.973, -5.942, 4.2, -3.1, 0.7, 6.5]]
    )
    m64 = copy.deepcopy(model).double()
    ref = gscfast.jacobian(m64, x.double(), backend="reference").diagonal(dim1=-2, dim2=-1)

    def rel(backend):
        got = gscfast.jacobian(model, x, backend=backend).diagonal(dim1=-2, dim2=-1)
        return ((got.double() - ref) / ref).abs().max()

    torch_err = rel("reference")  # torch's own float32 tanh and backward
    assert rel("numba") <= 2 * torch_err + 1e-6, (rel("numba"), torch_err)
