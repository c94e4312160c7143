"""Models the fused kernels take only in part: ``sweep`` (``gsc``, ``gsc_moments``,
``preactivation_stats``, ``analyze``), ``jacobian``, ``chain`` (``gsc_matrix``) and
``contributions`` (``effective_depth``) run the torch engine's path with every run of ``Linear ->
[norm] -> [activation]`` layers on numba's kernels (``lowering.fused_spans``; ``span_forward``,
``span_backward``, ``span_tail``, ``span_contributions``), and must give the reference backend's
numbers.

The spans sit first, last and between layers the kernels do not take (a module of the user's own,
a generic torch module, a residual block, a convolution), so both the span's output (forward) and
the gradient at its input (backward) feed the rest of the model. A spy checks that the kernels
ran. Widths are odd, ``chunk_size`` splits datasets, and every kernel buffer starts as NaN.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import gscfast
from gscfast.backends.lowering import fused_spans
from gscfast.validation import make_problem

pytest.importorskip("numba")
from gscfast.backends import numba_backend
from gscfast.backends.numba_backend import NumbaBackend


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(numba_backend, "POISON", True)
    numba_backend.release_workspace()


class Swish(nn.Module):
    """A module of the user's own: the generic rule takes it."""

    def forward(self, x):
        return x * torch.sigmoid(x) + 0.1 * x


def _mlp(widths: list[int], act=nn.Tanh) -> list[nn.Module]:
    out: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        out += [nn.Linear(a, b), act()]
    return out


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...], list[tuple[int, int]]]]:
    """name -> (model, sample shape, the spans as (first, last) paper indices)."""
    L = nn.Linear
    m: dict[str, tuple[nn.Module, tuple[int, ...], list[tuple[int, int]]]] = {}
    m["generic-middle"] = (
        nn.Sequential(*_mlp([9, 13, 11, 13]), L(13, 13), Swish(), *_mlp([13, 7, 13]), L(13, 5)),
        (9,),
        [(6, 4), (2, 1)],
    )
    m["generic-first"] = (
        nn.Sequential(
            *(L(9, 11), nn.SiLU(), L(11, 11), nn.Tanh()),
            *(L(11, 13), nn.LayerNorm(13), nn.GELU(), L(13, 7), nn.Sigmoid(), L(7, 5)),
        ),
        (9,),
        [(3, 1)],
    )
    m["generic-last"] = (
        nn.Sequential(*_mlp([9, 13, 11], nn.ReLU), L(11, 7), Swish()),
        (9,),
        [(3, 2)],
    )
    bn = nn.BatchNorm1d(13).eval()
    m["residual-middle"] = (
        nn.Sequential(
            L(9, 13),
            bn,
            nn.ELU(),
            gscfast.nn.Residual(nn.Sequential(L(13, 13), nn.Tanh()), 0.5),
            L(13, 11),
            nn.Softplus(),
            L(11, 4),
        ),
        (9,),
        [(4, 4), (2, 1)],
    )
    m["cnn-head"] = (
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            L(21, 13),
            nn.Tanh(),
            L(13, 11),
            nn.SELU(),
            L(11, 6),
        ),
        (2, 7),
        [(2, 1)],
    )
    for model, _, _ in m.values():
        g = torch.Generator().manual_seed(len(model))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(1.5 / max(p.shape[-1], 2)))
            bn.running_mean.copy_(0.3 * torch.randn(13, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(13, generator=g))
    return m


MODELS = _models()


def _data(name: str, dtype: torch.dtype, error: str):
    model, shape, _ = MODELS[name]
    model = copy.deepcopy(model).to(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, *shape, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        d1 = model(x[0]).shape[-1]
    if error == "kl":
        y = torch.randint(0, d1, (2, 11), generator=g)
    else:
        y = torch.randn(2, 11, d1, generator=g, dtype=torch.float64).to(dtype)
    return model, x, y


@pytest.fixture
def spy(monkeypatch):
    """The spans the kernels ran forward and backward, as ``(first, last)`` paper indices
    (``span_tail``, which takes the span that ends the model with the error, runs both)."""
    ran: dict[str, list[tuple[int, int]]] = {"forward": [], "backward": []}
    fwd, bwd, tail = NumbaBackend.span_forward, NumbaBackend.span_backward, NumbaBackend.span_tail

    def both(self, pb, span, *a, **k):
        ran["forward"].append((span[0].index, span[-1].index))
        ran["backward"].append((span[0].index, span[-1].index))
        return tail(self, pb, span, *a, **k)

    def forward(self, pb, span, *a, **k):
        ran["forward"].append((span[0].index, span[-1].index))
        return fwd(self, pb, span, *a, **k)

    def backward(self, pb, span, *a, **k):
        ran["backward"].append((span[0].index, span[-1].index))
        return bwd(self, pb, span, *a, **k)

    monkeypatch.setattr(NumbaBackend, "span_forward", forward)
    monkeypatch.setattr(NumbaBackend, "span_backward", backward)
    monkeypatch.setattr(NumbaBackend, "span_tail", both)
    return ran


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_spans(name):
    model, shape, spans = MODELS[name]
    pb, _ = make_problem(model.double(), torch.zeros(1, 3, *shape, dtype=torch.float64))
    assert [(s[0].index, s[-1].index) for s in fused_spans(pb.program)] == spans
    assert not NumbaBackend().fused(pb), "a mixed model is not fused as a whole"
    assert [(s[0].index, s[-1].index) for s in NumbaBackend().spans(pb)] == spans


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    a, b = a.double(), b.double()
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN patterns differ"
    tol = dict(rtol=1e-9, atol=1e-300) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-30)
    assert torch.allclose(a.nan_to_num(), b.nan_to_num(), **tol), f"{what}: {a} vs {b}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("error", ["dot", "kl"])
@pytest.mark.parametrize("name", list(MODELS))
def test_span_sweep_matches_reference(spy, name, error, dtype):
    model, x, y = _data(name, dtype, error)
    model64, x64, y64 = _data(name, torch.float64, error)
    spans = MODELS[name][2]
    kw = dict(error=error, chunk_size=7)  # chunks end inside the datasets
    for fn in (gscfast.gsc, gscfast.gsc_moments):
        got = fn(model, x, y, backend="numba", **kw)
        want = fn(model64, x64, y64, backend="reference", **kw)
        for field in got._fields if hasattr(got, "_fields") else [None]:
            a = got if field is None else getattr(got, field)
            b = want if field is None else getattr(want, field)
            if isinstance(a, torch.Tensor):
                _close(a, b, dtype, f"{fn.__name__} {field}")
        assert sorted(set(spy["forward"])) == sorted(spans)
        L = len(gscfast.compile_model(model).layers)  # no VJP of the first layer is needed
        assert sorted(set(spy["backward"])) == sorted(s for s in spans if s[1] < L or s[1] == 1)
        spy["forward"].clear()
        spy["backward"].clear()
    got_a = gscfast.analyze(model, x, y, backend="numba", **kw)
    want_a = gscfast.analyze(model64, x64, y64, backend="reference", **kw)
    for field in ("gsc", "preact_std", "sign_diversity"):
        _close(getattr(got_a, field), getattr(want_a, field), dtype, f"analyze {field}")
    spy["forward"].clear()
    spy["backward"].clear()
    got_p = gscfast.preactivation_stats(model, x, backend="numba", chunk_size=7)
    want_p = gscfast.preactivation_stats(model64, x64, backend="reference", chunk_size=7)
    _close(got_p.std, want_p.std, dtype, "preactivation std")
    _close(got_p.sign_diversity, want_p.sign_diversity, dtype, "sign diversity")
    assert sorted(set(spy["forward"])) == sorted(spans) and not spy["backward"]


@pytest.mark.parametrize("method", ["exact", "sketch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_span_gsc_matrix_matches_reference(spy, name, dtype, method):
    """``gsc_matrix``: chains start at every layer, inside spans too (``span_backward(at=k)``)."""
    model, x, y = _data(name, dtype, "kl")
    model64, x64, y64 = _data(name, torch.float64, "kl")
    kw = dict(error="kl", method=method, probes=3, chunk_size=7)
    got = gscfast.gsc_matrix(
        model, x, y, backend="numba", generator=torch.Generator().manual_seed(1), **kw
    )
    want = gscfast.gsc_matrix(
        model64, x64, y64, backend="reference", generator=torch.Generator().manual_seed(1), **kw
    )
    _close(got, want, dtype, f"gsc_matrix {method}")
    L = gscfast.compile_model(model).L  # chains never need the first layer's VJP
    assert set(spy["backward"]) == {s for s in MODELS[name][2] if s[1] < L}


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A 'trained' copy: every parameter moved."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return m


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_span_contributions_match_reference(spy_contrib, name, dtype):
    """``effective_depth``'s residual-trick recursion (``contributions``) through the spans of
    both models, and the exact zeros of a model against itself."""
    from gscfast.backends import get_backend
    from gscfast.backends.reference import ReferenceBackend

    model, x, y = _data(name, dtype, "kl")
    model64, x64, y64 = _data(name, torch.float64, "kl")
    trained, trained64 = _perturbed(model, 1), _perturbed(model64, 1)
    pb, _ = make_problem(trained, x, y, error="kl", chunk_size=7)
    pb64, _ = make_problem(trained64, x64, y64, error="kl")
    got = get_backend("numba", "cpu").contributions(pb, gscfast.compile_model(model))
    want = ReferenceBackend().contributions(pb64, gscfast.compile_model(model64))
    scale = want.nan_to_num().abs().amax((1, 2), keepdim=True)
    assert torch.equal(got.isnan(), want.isnan())
    err = ((got.double() - want).nan_to_num().abs() / scale).max().item()
    assert err <= (1e-12 if dtype == torch.float64 else 1e-4), err
    L = pb.L
    assert set(spy_contrib) == {s for s in MODELS[name][2] if s[1] < L}
    pb_same, _ = make_problem(model, x, y, error="kl")
    same = get_backend("numba", "cpu").contributions(pb_same, gscfast.compile_model(model))
    assert torch.all(same[:, 2:, 1:].nan_to_num() == 0), "model == init: every lambda >= 1 is 0"


@pytest.fixture
def spy_contrib(monkeypatch):
    ran: set[tuple[int, int]] = set()
    orig = NumbaBackend.span_contributions

    def spy(self, pb, span, *a, **k):
        ran.add((span[0].index, span[-1].index))
        return orig(self, pb, span, *a, **k)

    monkeypatch.setattr(NumbaBackend, "span_contributions", spy)
    return ran


def test_no_spans_for_whole_model_statistics(spy):
    """Frozen batch statistics are gathered over the whole model and train-mode batch norm couples
    the batch: both keep the torch engine's path (and its numbers)."""
    L = nn.Linear
    model = nn.Sequential(
        L(5, 7), nn.BatchNorm1d(7), nn.Tanh(), L(7, 7), Swish(), L(7, 7), nn.ReLU(), L(7, 3)
    ).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    y = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    for batchnorm in ("frozen", "batch"):
        pb, _ = make_problem(model, x, y, error="dot", batchnorm=batchnorm)
        assert NumbaBackend().spans(pb) == []
        got = gscfast.gsc(model, x, y, batchnorm=batchnorm, backend="numba")
        want = gscfast.gsc(model, x, y, batchnorm=batchnorm, backend="reference")
        _close(got, want, torch.float64, f"gsc {batchnorm}")
    assert spy["forward"] == [] and spy["backward"] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_span_jacobian_matches_reference(spy, name, dtype):
    """Every ``(start, end)`` pair: the spans are cut at both boundaries, and the ones between
    them take the Jacobian's rows (one per output) on the kernels."""
    model, x, _ = _data(name, dtype, "dot")
    model64, x64, _ = _data(name, torch.float64, "dot")
    L = gscfast.compile_model(model).L
    inside = 0
    for start in range(1, L + 2):
        for end in range(1, min(start, L) + 1):
            spy["backward"].clear()
            got = gscfast.jacobian(model, x[0], start=start, end=end, backend="numba", chunk_size=4)
            want = gscfast.jacobian(model64, x64[0], start=start, end=end, backend="reference")
            scale = want.abs().amax((1, 2), keepdim=True).clamp(min=1e-300)
            err = ((got.double() - want).abs() / scale).max().item()
            assert err <= (1e-12 if dtype == torch.float64 else 1e-4), (start, end, err)
            # a span overlapping the layers between the boundaries ran on the kernels
            spans = [s for s in MODELS[name][2] if s[1] < start and s[0] >= end and end < start]
            assert bool(spy["backward"]) == bool(spans), (start, end)
            inside += bool(spans)
    assert inside > 0


def test_drop_in_jacobian_of_a_mixed_model_is_torchs(spy):
    """``gscfast.autograd.jacobian`` on torch's own modules takes the engine, spans included."""
    model, x, _ = _data("generic-first", torch.float64, "dot")
    got = gscfast.autograd.jacobian(model, x[0])
    want = torch.autograd.functional.jacobian(model, x[0])
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert spy["backward"], "the drop-in's fast path ran the spans on numba's kernels"
