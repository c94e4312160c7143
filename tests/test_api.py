"""Every public function, every fast backend, against the reference backend on random models.

float64 results must agree with the reference to 1e-9 relative; float32 results must agree with
the float64 reference to 1e-4 in log space (relative error of the float32 computation itself).

Random tiny models can be ill-conditioned in float32 (a batch norm over 3 samples, a layer norm
over 3 features, a ReLU pre-activation a rounding error from 0): there the float32 tolerance is
4x the reference backend's own float32 error on the same case (``f32_tol``), and a case where even
the reference's float32 result has another NaN or sign pattern than its float64 one is discarded
(``assume``), as beyond float32. A broken kernel is off by far more than the reference's rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import Case, cases, norm_condition, to64

import gscfast

FAST = [b for b in gscfast.available_backends("cpu") if b != "reference"]
DTYPES = [torch.float64, torch.float32]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


def f32_tol(
    ref32: torch.Tensor,
    ref64: torch.Tensor,
    case,
    base: float = 1e-4,
    rerun: Callable[[Case], torch.Tensor] | None = None,
) -> float:
    """The float32 tolerance of a case in log space: ``base``; 4x the log error of the reference
    backend's own float32 result ``ref32`` against ``ref64``; 4x the rounding a normalization's
    centring amplifies (``norm_condition``); or, with ``rerun`` (the quantity by the reference
    backend on a given case), 4x the largest log error of the reference's float32 result on the
    case with its inputs and parameters moved by about one float32 rounding (``PERTURBED`` draws,
    each against its own float64 value): whichever is largest. The reference's own error alone
    is not enough: where the problem amplifies rounding, it can be luckily small while a fast
    backend that sums in another order is off by the full amount. One such case (a batch of 3
    through a batch norm and tanh): the reference's float32 error was 1.2e-4 on the case and
    1.3e-4 to 1.3e-3 on eight such perturbations of it, the torch engine's 7.6e-4, and 5e-5 to
    5.5e-4 on the perturbations: both are as accurate as float32 allows there."""
    base = max(base, 4 * torch.finfo(torch.float32).eps * norm_condition(case))
    tol = max(base, 4 * _log_error(ref32, ref64))
    if rerun is not None:
        tol = max(tol, 4 * perturbed_error(case, rerun, _log_error))
    return tol


PERTURBED = 3


def perturbed_error(
    case: Case,
    rerun: Callable[[Case], torch.Tensor],
    error: Callable[[torch.Tensor, torch.Tensor], float],
) -> float:
    """The largest ``error(float32 result, float64 result)`` of ``rerun`` over ``PERTURBED``
    copies of ``case`` moved by about one float32 rounding (``perturbed``)."""
    worst = 0.0
    for seed in range(PERTURBED):
        moved = perturbed(case, seed)
        worst = max(worst, error(rerun(moved), rerun(to64(moved))))
    return worst


def perturbed(case: Case, seed: int) -> Case:
    """``case`` in float32 (a float64 case of float32 values converts exactly) with its inputs
    and parameters each multiplied by ``1 + eps z``, ``z`` standard normal (seeded), ``eps``
    float32's: the same problem up to about one float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return t * (1 + eps * torch.randn(t.shape, generator=g, dtype=t.dtype))

    model = copy.deepcopy(case.model).float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(move(p))
    return dataclasses.replace(case, model=model, x=move(case.x), y=case.y.float())


def _log_error(r32: torch.Tensor, r64: torch.Tensor) -> float:
    """The largest log error of ``r32`` against ``r64`` where ``r64`` is clearly nonzero (0 if
    none); a case where they differ in which entries are finite or in sign is discarded."""
    r32, r64 = r32.double(), r64.double()
    fin = torch.isfinite(r64)
    assume(torch.equal(fin, torch.isfinite(r32)))
    if not fin.any():
        return 0.0
    big = fin & (r64.abs() > 1e-6 * r64[fin].abs().max())
    assume(torch.equal(torch.sign(r32[big]), torch.sign(r64[big])))
    err = (r32[big].abs().log() - r64[big].abs().log()).abs()
    return float(err.max()) if err.numel() else 0.0


def assert_agree(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "", tol: float = 1e-4
) -> None:
    """Same shape, same NaN/Inf pattern, close values (relative for float64, log for float32)."""
    assert got.shape == ref.shape, what
    assert got.dtype == dtype, what
    got, ref = got.double(), ref.double()
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got)), f"{what}: non-finite entries differ\n{got}\n{ref}"
    assert torch.equal(got[~fin].isnan(), ref[~fin].isnan()), what
    g, r = got[fin], ref[fin]
    if dtype == torch.float64:
        scale = r.abs().max().clamp(min=1e-300) if r.numel() else 1
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12 * scale), (
            f"{what}: max rel. error {((g - r).abs() / r.abs()).max():.3g}\n{g}\n{r}"
        )
    else:
        # log space where values are clearly nonzero; absolute agreement for (near-)zeros
        big = r.abs() > 1e-6 * (r.abs().max() if r.numel() else 1)
        assert torch.equal(torch.sign(g[big]), torch.sign(r[big])), what
        err = (g[big].abs().log() - r[big].abs().log()).abs()
        assert err.max() <= tol if err.numel() else True, (
            f"{what}: log error {err.max():.3g} (tolerance {tol:.3g})"
        )


def both(case, dtype):
    """(case in dtype, the float64 case the reference runs on). A case whose normalizations
    centre away more than all but 10 bits of ``dtype`` is discarded as beyond it: behind a norm of
    a constant input (every sample or feature equal) the output is rounding noise, and a GSC
    relative to it is a ratio of noise (the exact value is a division by zero)."""
    c64 = case if dtype == torch.float64 else to64(case)
    assume(norm_condition(c64) * torch.finfo(dtype).eps < 1e-3)
    return case, c64


def discard_float32_underflow(test):
    """Discards a float32 case that gscfast refuses because its values underflow float32 (right
    or refused: a random deep model can have gradients below 1e-19; the refusal itself is tested
    in test_never_wrong.py)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except gscfast.NumericalError as e:
            if kwargs.get("dtype") != torch.float32 or "underflow" not in str(e):
                raise
            assume(False)

    return run


def targets(case, error):
    return case.y if error == "dot" else case.labels


def state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def assert_unchanged(model, before):
    sd, modes = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), f"{k} changed"
    assert modes == [m.training for m in model.modules()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(
    data=st.data(), error=st.sampled_from(["dot", "kl"]), bn=st.sampled_from(["batch", "frozen"])
)
@discard_float32_underflow
def test_gsc_and_analyze(backend, dtype, data, error, bn):
    case = data.draw(cases(dtype=dtype))
    case, c64 = both(case, dtype)
    before = state(case.model)
    ref = gscfast.gsc(
        c64.model, c64.x, targets(c64, error), error=error, batchnorm=bn, backend="reference"
    )
    got = gscfast.gsc(
        case.model, case.x, targets(case, error), error=error, batchnorm=bn, backend=backend
    )
    tol = 1e-4
    if dtype == torch.float32:

        def rerun(c):
            return gscfast.gsc(
                c.model, c.x, targets(c, error), error=error, batchnorm=bn, backend="reference"
            )

        tol = f32_tol(rerun(case), ref, c64, rerun=rerun)
    assert_agree(got, ref, dtype, "gsc", tol)
    if dtype == torch.float64:  # single float32 datapoints can be ill-conditioned (cancellation)
        per = gscfast.gsc(
            case.model,
            case.x,
            targets(case, error),
            error=error,
            batchnorm=bn,
            backend=backend,
            reduction="none",
        )
        per_ref = gscfast.gsc(
            c64.model,
            c64.x,
            targets(c64, error),
            error=error,
            batchnorm=bn,
            backend="reference",
            reduction="none",
        )
        assert_agree(per, per_ref, dtype, "gsc per datapoint")
    a = gscfast.analyze(
        case.model, case.x, targets(case, error), error=error, batchnorm=bn, backend=backend
    )
    assert_agree(a.gsc, got, dtype, "analyze.gsc", tol)
    assert_unchanged(case.model, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(data=st.data(), bn=st.sampled_from(["batch", "frozen"]))
@discard_float32_underflow
def test_preactivation_stats(backend, dtype, data, bn):
    case, c64 = both(data.draw(cases(dtype=dtype)), dtype)
    before = state(case.model)
    ref = gscfast.preactivation_stats(c64.model, c64.x, batchnorm=bn, backend="reference")
    got = gscfast.preactivation_stats(case.model, case.x, batchnorm=bn, backend=backend)
    if dtype == torch.float64:
        assert_agree(got.std, ref.std, dtype, "std")
        assert_agree(got.sign_diversity, ref.sign_diversity, dtype, "sign diversity")
    else:  # a float32 pre-activation may sit on the other side of 0; stds agree in log space
        r32 = gscfast.preactivation_stats(case.model, case.x, batchnorm=bn, backend="reference")

        def rerun(c):
            return gscfast.preactivation_stats(c.model, c.x, batchnorm=bn, backend="reference").std

        assert_agree(got.std, ref.std, dtype, "std", f32_tol(r32.std, ref.std, c64, rerun=rerun))
        flips = (r32.sign_diversity.double() - ref.sign_diversity.double()).nan_to_num().abs()
        assert torch.allclose(
            got.sign_diversity.double(),
            ref.sign_diversity.double(),
            atol=max(0.05, 2 * float(flips.max())),
            equal_nan=True,
        )
    assert_unchanged(case.model, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(
    data=st.data(), error=st.sampled_from(["dot", "kl"]), bn=st.sampled_from(["batch", "frozen"])
)
@discard_float32_underflow
def test_gsc_matrix_exact(backend, dtype, data, error, bn):
    case, c64 = both(data.draw(cases(dtype=dtype, max_depth=6, max_width=12, max_batch=3)), dtype)
    ref = gscfast.gsc_matrix(
        c64.model, c64.x, targets(c64, error), error=error, batchnorm=bn, backend="reference"
    )
    got = gscfast.gsc_matrix(
        case.model, case.x, targets(case, error), error=error, batchnorm=bn, backend=backend
    )
    tol = 1e-4
    if dtype == torch.float32:

        def rerun(c):
            return gscfast.gsc_matrix(
                c.model, c.x, targets(c, error), error=error, batchnorm=bn, backend="reference"
            )

        tol = f32_tol(rerun(case), ref, c64, rerun=rerun)
    assert_agree(got, ref, dtype, "gsc_matrix", tol)
    g = gscfast.gsc(
        case.model, case.x, targets(case, error), error=error, batchnorm=bn, backend=backend
    )
    assert_agree(got[:, 0], g, dtype, "first column is GSC(l, 0)", tol)


@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(data=st.data(), bn=st.sampled_from(["batch", "frozen"]))
def test_gsc_matrix_sketch_same_probes(backend, data, bn):
    """With the same generator, a backend's sketch equals the reference's to 1e-9."""
    case = data.draw(cases(max_depth=5, max_width=10, max_batch=3))
    kw = dict(batchnorm=bn, method="sketch", probes=7)
    ref = gscfast.gsc_matrix(
        case.model,
        case.x,
        case.y,
        backend="reference",
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    got = gscfast.gsc_matrix(
        case.model,
        case.x,
        case.y,
        backend=backend,
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    assert_agree(got, ref, torch.float64, "sketch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(data=st.data())
@discard_float32_underflow
def test_jacobian(backend, dtype, data):
    case, c64 = both(data.draw(cases(dtype=dtype, max_batch=4)), dtype)
    L = gscfast.compile_model(case.model).L
    start = data.draw(st.one_of(st.none(), st.integers(1, L)))
    end = data.draw(st.one_of(st.none(), st.integers(1, start or L)))
    kw = dict(start=start, end=end, batchnorm="frozen")
    got = gscfast.jacobian(case.model, case.x, backend=backend, **kw)
    ref = gscfast.jacobian(c64.model, c64.x, backend="reference", **kw)
    if dtype == torch.float64:
        assert_agree(got, ref, dtype, "jacobian")
    else:  # signed entries can cancel: float32 error relative to each sample's Jacobian norm
        assert got.dtype == dtype and got.shape == ref.shape

        def rel(j, r=ref):
            return float(
                (
                    (j.double() - r).flatten(-2).norm(dim=-1)
                    / r.flatten(-2).norm(dim=-1).clamp(min=1e-30)
                ).max()
            )

        def rerun(c):
            return gscfast.jacobian(c.model, c.x, backend="reference", **kw)

        # the reference's own float32 error, on the case and on the case moved by about one
        # float32 rounding (f32_tol: on one draw it can be luckily small)
        own = max(rel(rerun(case)), perturbed_error(c64, rerun, rel))
        # Where float32 itself does not fix the Jacobian to 1% (a frozen batch norm over 2-4
        # samples can divide by a near-zero variance: the reference's own float32 error reached
        # 14%), the rounding of any two float32 computations differs by more than a fixed
        # multiple; such cases say nothing about a backend (its float64 run above is exact).
        assume(own < 1e-2)
        err = rel(got)
        assert err <= max(1e-4, 4 * own), (err, own)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(
    data=st.data(), error=st.sampled_from(["dot", "kl"]), bn=st.sampled_from(["batch", "frozen"])
)
@discard_float32_underflow
def test_effective_depth(backend, dtype, data, error, bn):
    case, c64 = both(data.draw(cases(dtype=dtype, max_depth=8, max_width=16)), dtype)
    init = copy.deepcopy(case.model)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():  # the "trained" model: the initial one with every parameter moved
        for p in case.model.parameters():
            p.add_(
                0.3
                * torch.randn(p.shape, generator=g, dtype=p.dtype)
                * p.abs().mean().clamp(min=1e-3)
            )
    init64 = init if dtype == torch.float64 else copy.deepcopy(init).double()
    c64 = c64 if dtype == torch.float64 else to64(case)
    d_ref, p_ref = gscfast.effective_depth(
        c64.model,
        init64,
        c64.x,
        targets(c64, error),
        error=error,
        batchnorm=bn,
        backend="reference",
    )
    d_got, p_got = gscfast.effective_depth(
        case.model, init, case.x, targets(case, error), error=error, batchnorm=bn, backend=backend
    )
    tol = 1e-4
    if dtype == torch.float32:

        def rerun(c):  # the initial model in the case's dtype, as it is
            start = init if c.x.dtype == torch.float32 else init64
            return gscfast.effective_depth(
                c.model, start, c.x, targets(c, error), error=error, batchnorm=bn,
                backend="reference",
            )[1]  # fmt: skip

        tol = f32_tol(rerun(case), p_ref, c64, rerun=rerun)
    assert_agree(p_got, p_ref, dtype, "contribution profile", tol)
    if dtype == torch.float64:
        assert d_got == d_ref


def test_chunking_does_not_change_results():
    """Chunks across datasets, across samples, and the frozen-BN pre-pass per dataset group."""
    torch.manual_seed(0)
    model = gscfast.mlp(4, 9, act="tanh", norm="batch", out_features=3, seed=1, dtype=torch.float64)
    x = torch.randn(3, 7, 9, dtype=torch.float64)
    y = torch.randn(3, 7, 3, dtype=torch.float64)
    for backend in FAST:
        for bn in ("batch", "frozen"):
            full = gscfast.gsc_matrix(model, x, y, batchnorm=bn, backend=backend)
            for chunk in (1, 2, 5, 8, 100):
                part = gscfast.gsc_matrix(
                    model, x, y, batchnorm=bn, backend=backend, chunk_size=chunk
                )
                assert torch.allclose(part, full, rtol=1e-12, equal_nan=True), (backend, bn, chunk)


def test_sketch_is_unbiased():
    """The sketched squared norms average to the exact ones (many probes, loose tolerance)."""
    model = gscfast.mlp(6, 12, act="tanh", norm="batch", seed=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, generator=g, dtype=torch.float64)
    y = torch.randn(8, 12, generator=g, dtype=torch.float64)
    exact = gscfast.gsc_matrix(model, x, y, backend="torch")
    sk = gscfast.gsc_matrix(
        model,
        x,
        y,
        backend="torch",
        method="sketch",
        probes=4000,
        generator=torch.Generator().manual_seed(1),
    )
    low = torch.ones_like(exact, dtype=torch.bool).tril()
    rel = ((sk - exact).abs() / exact)[low]
    assert rel.max() < 0.1, rel.max()
    assert torch.allclose(sk[:, 0], exact[:, 0], rtol=1e-12)  # row l = 0 is always exact
    a = gscfast.gsc_matrix(
        model, x, y, method="sketch", probes=5, generator=torch.Generator().manual_seed(9)
    )
    b = gscfast.gsc_matrix(
        model, x, y, method="sketch", probes=5, generator=torch.Generator().manual_seed(9)
    )
    c = gscfast.gsc_matrix(
        model, x, y, method="sketch", probes=5, generator=torch.Generator().manual_seed(8)
    )
    assert torch.equal(a.nan_to_num(), b.nan_to_num()) and not torch.equal(
        a.nan_to_num(), c.nan_to_num()
    )


def test_effective_depth_of_untrained_model_is_zero():
    model = gscfast.mlp(10, 16, act="relu", norm="batch", seed=0, dtype=torch.float64)
    x, y = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    depth, profile = gscfast.effective_depth(model, model, x, y)
    assert depth == 0
    assert torch.all(profile[2:, 1:].nan_to_num() == 0)
    assert profile[0, 0] == 1 and torch.isnan(profile[0, 1]) and torch.isnan(profile[1, 1])


def test_explosion_rate_of_a_geometric_sequence():
    g = 1.3 ** torch.arange(11, dtype=torch.float64)
    assert abs(gscfast.explosion_rate(g) - 1.3) < 1e-12


def test_results_on_callers_dtype_and_shapes():
    model = gscfast.mlp(3, 5, act="relu", out_features=2, seed=0)
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    assert gscfast.gsc(model, x, y).shape == (5,)
    assert gscfast.gsc(model, x, y).dtype == torch.float32
    assert gscfast.gsc(model, x, y, reduction="none").shape == (4, 5)
    assert gscfast.gsc(
        model, x[None].expand(3, 4, 5), y[None].expand(3, 4, 2), reduction="none"
    ).shape == (3, 4, 5)
    assert gscfast.gsc_matrix(model, x, y).shape == (5, 5)
    assert gscfast.jacobian(model, x).shape == (4, 2, 5)
    assert gscfast.jacobian(model, x, start=3, end=2).shape == (4, 5, 5)
    a = gscfast.analyze(model, x, y)
    assert set(a.to_dict()) >= {"gsc", "preact_std", "sign_diversity", "rate"}
    assert list(a.to_frame().columns) == ["gsc", "preact_std", "sign_diversity"]
