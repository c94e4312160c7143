"""Small fixed problems and the comparison used by every GPU-backend check (BackPACK-style: one
settings list, each run through a fused backend and the reference backend, then compared).

Widths are chosen so that masks and multi-block loops are exercised: 5, 7, 17, 37 (not multiples
of 16 or 64), 70 (more than one 64-column CUDA tile), and batches of 20 rows (more than one
16-row forward tile).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

import gscfast
from gscfast.backends.reference import ReferenceBackend
from gscfast.validation import Problem, make_problem


@dataclass
class GpuCase:
    id: str
    model: nn.Module
    x: torch.Tensor  # [D, B, n]
    y: torch.Tensor  # targets ("dot") or labels ("kl")
    error: str
    batchnorm: str = "frozen"

    def to(self, dtype: torch.dtype, device="cpu") -> GpuCase:
        y = self.y.to(device=device, dtype=dtype) if self.error == "dot" else self.y.to(device)
        return GpuCase(
            self.id,
            copy.deepcopy(self.model).to(device=device, dtype=dtype),
            self.x.to(device=device, dtype=dtype),
            y,
            self.error,
            self.batchnorm,
        )

    def problem(self, error: bool = True, program=None) -> Problem:
        pb, _ = make_problem(
            self.model,
            self.x,
            self.y if error else None,
            error=self.error if error else None,
            batchnorm=self.batchnorm,
            program=program,
        )
        return pb


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                    * math.sqrt(1.5 / m.in_features)
                )
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(
                        1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                    )
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
                if isinstance(m, nn.BatchNorm1d) and m.running_mean is not None:
                    m.running_mean.copy_(
                        0.3 * torch.randn(m.num_features, generator=g, dtype=torch.float64)
                    )
                    m.running_var.copy_(
                        0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64)
                    )
    return model.double()


def _data(seed: int, D: int, B: int, n: int, m: int, error: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(D, B, n, generator=g, dtype=torch.float64)
    y = (
        torch.randn(D, B, m, generator=g, dtype=torch.float64)
        if error == "dot"
        else torch.randint(0, m, (D, B), generator=g)
    )
    return x, y


def _bn(d: int, affine: bool, eval_mode: bool) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(d, affine=affine)
    return bn.eval() if eval_mode else bn


def cases() -> list[GpuCase]:
    L = nn.Linear
    out = []

    def add(id, model, D, B, error, seed, **kw):
        model = _seeded(model, seed)
        n = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
        m = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
        x, y = _data(seed + 1, D, B, n, m, error)
        out.append(GpuCase(id, model, x, y, error, **kw))

    add(
        "ln-tanh-selu",
        nn.Sequential(L(5, 7), nn.LayerNorm(7), nn.Tanh(), L(7, 6, bias=False), nn.SELU(), L(6, 4)),
        2,
        3,
        "dot",
        0,
    )
    add(
        "bn-eval-relu-leaky-sigmoid",
        nn.Sequential(
            L(6, 17),
            _bn(17, True, True),
            nn.ReLU(),
            L(17, 9),
            nn.LeakyReLU(0.07),
            L(9, 5, bias=False),
            nn.Sigmoid(),
        ),
        1,
        20,
        "kl",
        10,
    )
    add(
        "bn-frozen-tanh-elu",
        nn.Sequential(
            L(4, 9),
            _bn(9, False, False),
            nn.Tanh(),
            L(9, 9),
            _bn(9, True, False),
            nn.ELU(0.8),
            L(9, 3),
        ),
        2,
        4,
        "dot",
        20,
    )
    add(
        "ln-affine-gelu-softplus-37",
        nn.Sequential(
            L(7, 37),
            nn.LayerNorm(37),
            nn.GELU(),
            L(37, 20),
            nn.LayerNorm(20, elementwise_affine=False),
            nn.GELU(approximate="tanh"),
            L(20, 37),
            nn.Softplus(beta=1.5, threshold=3.0),
            L(37, 6),
            nn.Identity(),
        ),
        1,
        3,
        "kl",
        30,
    )
    add(
        "wide-70",
        nn.Sequential(L(3, 70), nn.Tanh(), L(70, 66), nn.ReLU(), L(66, 5)),
        1,
        2,
        "dot",
        40,
    )
    return out


def fallback_cases() -> list[GpuCase]:
    """Problems the fused kernels do not take: they must still give the reference's numbers."""
    L = nn.Linear
    out = []
    m = _seeded(nn.Sequential(L(4, 6), nn.BatchNorm1d(6), nn.Tanh(), L(6, 3)), 50)
    x, y = _data(51, 2, 4, 4, 3, "dot")
    out.append(GpuCase("bn-coupled", m, x, y, "dot", batchnorm="batch"))
    m = _seeded(
        nn.Sequential(
            L(4, 5), nn.ReLU(), gscfast.nn.Residual(nn.Sequential(L(5, 5), nn.Tanh()), 0.5), L(5, 3)
        ),
        60,
    )
    x, y = _data(61, 1, 3, 4, 3, "dot")
    out.append(GpuCase("residual", m, x, y, "dot"))
    return out


class Swish(nn.Module):
    """A module of the user's own (the generic rule takes it)."""

    def forward(self, x):
        return x * torch.sigmoid(x) + 0.1 * x


def mixed_cases() -> list[GpuCase]:
    """Models the fused kernels take in part: ``sweep`` runs their runs of layers (spans) on the
    kernels, the rest on the torch engine's path."""
    L = nn.Linear
    out = []
    m = _seeded(
        nn.Sequential(
            *(L(5, 17), nn.LayerNorm(17), nn.Tanh(), L(17, 7), nn.GELU()),
            *(L(7, 7), Swish(), L(7, 17), nn.ReLU()),
            *(L(17, 5), nn.SELU(), L(5, 3)),
        ),
        70,
    )
    x, y = _data(71, 2, 20, 5, 3, "dot")
    out.append(GpuCase("generic-middle", m, x, y, "dot"))
    m = _seeded(
        nn.Sequential(
            *(L(4, 5), nn.Tanh(), L(5, 37), nn.LayerNorm(37), nn.ELU()),
            gscfast.nn.Residual(nn.Sequential(L(37, 37), nn.Softplus()), 0.5),
            *(L(37, 7), nn.Sigmoid(), L(7, 3)),
        ),
        80,
    )
    x, y = _data(81, 2, 20, 4, 3, "kl")
    out.append(GpuCase("residual-kl", m, x, y, "kl"))
    return out


def check_spans(be, case: GpuCase, dtype: torch.dtype, device="cpu") -> None:
    """``check_backend`` on a mixed case, and that every span ran on ``be``'s kernels (the
    Jacobians cut spans at their boundaries: more, shorter ones)."""
    cls, ran = type(be), set()
    orig = cls.span_forward

    def spy(self, pb, span, *a, **k):
        ran.add((span[0].index, span[-1].index))
        return orig(self, pb, span, *a, **k)

    spans = {(s[0].index, s[-1].index) for s in be.spans(case.to(dtype, device).problem())}
    assert spans, f"{case.id}: the kernels take some of its layers"
    with mock.patch.object(cls, "span_forward", spy):
        check_backend(be, case, dtype, device)  # every method
    assert ran >= spans


def perturbed(case: GpuCase, seed: int = 7) -> GpuCase:
    """A 'trained' copy: every parameter moved (effective-depth tests use the original as init)."""
    c = copy.deepcopy(case)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(
                0.3
                * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
                * p.abs().mean().clamp(min=1e-3)
            )
    return c


def probes(case: GpuCase, R: int = 3, seed: int = 5):
    widths = gscfast.compile_model(case.model).widths(case.x.shape[-1])
    g = torch.Generator().manual_seed(seed)
    V = {
        l: (torch.randint(0, 2, (R, 1, widths[l]), generator=g) * 2 - 1).double()
        for l in range(1, len(widths) - 1)
    }
    return lambda l: V[l]


# ----------------------------------------------------------------------------- comparison


def assert_close(
    got: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    reduce_dims: tuple[int, ...] = (0,),
) -> None:
    """Same shape and NaN pattern; ``|got - ref| <= rtol |ref| + atol * scale`` with ``scale`` the
    largest ``|ref|`` over ``reduce_dims`` (per entry of the other dims): float64 1e-9 / 1e-12,
    float32 (against a float64 reference) 2e-4 / 2e-6."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert got.dtype == dtype, (what, got.dtype)
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), (
        f"{what}: NaN pattern differs\n{got}\n{ref}"
    )
    g, r = got.nan_to_num(), ref.nan_to_num()
    scale = r.abs().amax(dim=reduce_dims, keepdim=True) if reduce_dims else r.abs().max()
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (2e-4, 2e-6)
    err = (g - r).abs() - rtol * r.abs() - atol * scale
    assert err.max() <= 0, (
        f"{what}: max |got - ref| = {(g - r).abs().max():.3g} (at {int(err.argmax())})"
    )


_REF: dict = {}


def _ref(case: GpuCase, key: tuple, compute):
    """The reference backend's answer, computed once per case (float64, CPU) and reused by every
    backend and dtype: the autograd reference is most of these tests' time."""
    k = (case.id,) + key
    if k not in _REF:
        _REF[k] = compute()
    return _REF[k]


def check_backend(be, case: GpuCase, dtype: torch.dtype, device="cpu", methods=None) -> None:
    """Run every method of ``be`` on ``case`` in ``dtype`` and compare with the float64 reference."""
    methods = methods or ("sweep", "chain", "sketch", "jacobian", "contributions")
    c, c64 = case.to(dtype, device), case.to(torch.float64, "cpu")
    ref = ReferenceBackend()
    pb, pb64 = c.problem(), c64.problem()
    L = pb.L
    if "sweep" in methods:
        a = be.sweep(pb, grads=True, stats=True)
        b = _ref(case, ("sweep",), lambda: ref.sweep(pb64, grads=True, stats=True))
        assert_close(a.sq_out, b.sq_out, dtype, "sweep sq_out")
        assert_close(a.sq_grad, b.sq_grad, dtype, "sweep sq_grad")
        for l in range(L + 1):
            assert (a.moments[l] is None) == (b.moments[l] is None), l
            if b.moments[l] is None:
                continue
            ma, mb = a.moments[l], b.moments[l]
            assert ma.count == mb.count
            tol = (
                dict(rtol=1e-9, atol=1e-12)
                if dtype == torch.float64
                else dict(rtol=1e-3, atol=1e-5)
            )
            std_a, std_b = (ma.m2 / ma.count).sqrt().cpu(), (mb.m2 / mb.count).sqrt()
            assert torch.allclose(ma.mean.cpu(), mb.mean, **tol), f"moments mean f_{l}"
            assert torch.allclose(std_a, std_b, **tol), f"moments std f_{l}"
            if dtype == torch.float64:
                assert torch.equal(ma.pos.cpu(), mb.pos) and torch.equal(ma.neg.cpu(), mb.neg), (
                    f"signs f_{l}"
                )
            else:
                assert (ma.pos.cpu() - mb.pos).abs().max() <= 1 and (
                    ma.neg.cpu() - mb.neg
                ).abs().max() <= 1
        a = be.sweep(pb, grads=False, stats=False)
        assert_close(a.sq_out, b.sq_out, dtype, "forward-only sq_out")
    if "chain" in methods:
        assert_close(
            be.chain(pb, None),
            _ref(case, ("chain",), lambda: ref.chain(pb64, None)),
            dtype,
            "chain exact",
        )
    if "sketch" in methods:
        want = _ref(case, ("sketch",), lambda: ref.chain(pb64, probes(case)))
        assert_close(be.chain(pb, probes(case)), want, dtype, "chain sketch")
    if "jacobian" in methods:
        pj, pj64 = c.problem(error=False), c64.problem(error=False)
        for start, end in ((L + 1, 1), (L, max(1, L - 1)), (L + 1, L), (2, 2)):
            if end > start:
                continue
            J = be.jacobian(pj, start, end)
            J64 = _ref(
                case,
                ("jacobian", start, end),
                lambda start=start, end=end: ref.jacobian(pj64, start, end),
            )
            if dtype == torch.float64:
                assert_close(J, J64, dtype, f"jacobian {start}->{end}", reduce_dims=(0, 1, 2))
            else:
                err = (J.double().cpu() - J64).flatten(-2).norm(dim=-1) / J64.flatten(-2).norm(
                    dim=-1
                )
                assert err.max() <= 1e-4, f"jacobian {start}->{end}: {err.max():.3g}"
    if "contributions" in methods:
        init = gscfast.compile_model(c.model)
        t, t64 = perturbed(case).to(dtype, device), perturbed(case).to(torch.float64)
        init64 = gscfast.compile_model(c64.model)
        got = be.contributions(t.problem(), init)
        want = _ref(case, ("contributions",), lambda: ref.contributions(t64.problem(), init64))
        assert_close(got, want, dtype, "contributions")
        same = be.contributions(c.problem(), init)  # model == init: every lambda >= 1 term is 0
        assert torch.all(same[:, 2:, 1:].nan_to_num() == 0), "contributions of init == model"


def check_overflow_refused(be) -> None:
    """A float32 layer norm whose input variance overflows: ``be`` (fused) refuses with the torch
    backend's message instead of returning the zeros ``1 / sqrt(inf)`` would give."""
    from gscfast.backends.torch_engine import TorchBackend

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g) * 1e30, torch.randn(16, 6, generator=g)
    pb, _ = make_problem(gscfast.mlp(3, 6, act="tanh", norm="layer", seed=0), x, y, error="dot")
    assert be.fused(pb), "the fused kernels must take this case"
    try:
        TorchBackend().sweep(pb, grads=True, stats=True)
    except ValueError as e:
        want = str(e)
    else:
        raise AssertionError("the torch backend must refuse")
    assert "model[1] (LayerNorm) (the variance of its input overflows)" in want
    for method, args in (
        ("sweep", dict(grads=True, stats=True)),
        ("sweep", dict(grads=False, stats=True)),
    ):
        try:
            getattr(be, method)(pb, **args)
        except ValueError as e:
            assert str(e) == want, (method, str(e))
        else:
            raise AssertionError(f"{be.name}.{method} returned a result")
