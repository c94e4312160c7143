"""The reference backend against quantities computed independently here with ``torch.func``.

The ground truth of this file splits models into layers itself, evaluates batch norm by its
formula (batch, frozen or running statistics), calls every other module directly, and takes every
derivative with ``torch.func`` (``jacrev``, ``grad``, ``vmap``), one datapoint at a time.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev, vmap

from gscfast.backends.reference import ReferenceBackend
from gscfast.compiler import compile_model
from gscfast.nn import Residual, mlp
from gscfast.validation import Problem

DT = torch.float64
D, B, N_IN, N_OUT = 2, 3, 4, 3
ACTS = (
    nn.ReLU,
    nn.Tanh,
    nn.SELU,
    nn.Sigmoid,
    nn.GELU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Identity,
)


# ----------------------------------------------------------------------------- models


def _randomize(model: nn.Module, seed: int, running: bool = False) -> nn.Module:
    """Random (nonzero) parameters, and running statistics if ``running``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            shift = 0.2 if p.dim() == 1 else 0.0  # vectors (biases, norm weights) off zero
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT) + shift)
        if running:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d) and m.running_mean is not None:
                    m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=DT))
                    m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=DT))
    return model


def _mlp_tanh(seed=0):
    m = mlp(3, 5, act="tanh", in_features=N_IN, out_features=N_OUT, bias=True, seed=seed, dtype=DT)
    with torch.no_grad():  # mlp's biases start at zero: make them nontrivial
        g = torch.Generator().manual_seed(100 + seed)
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g, dtype=DT))
    return m


def _hand_ln(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(N_IN, 6, bias=False),
        nn.LayerNorm(6),
        nn.ReLU(),
        nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6, elementwise_affine=False), nn.GELU()),
        Residual(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), 0.7),
        nn.Linear(6, N_OUT),
    ).to(DT)
    return _randomize(m, seed)


def _bn_eval(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(N_IN, 5),
        nn.BatchNorm1d(5),
        nn.SELU(),
        nn.Linear(5, 5, bias=False),
        nn.BatchNorm1d(5, affine=False),
        nn.LeakyReLU(0.1),
        nn.Linear(5, N_OUT),
    ).to(DT)
    return _randomize(m, seed, running=True).eval()


def _bn_mlp(seed=0):
    return mlp(
        3, 5, act="relu", norm="batch", in_features=N_IN, out_features=N_OUT, seed=seed, dtype=DT
    )


def _bn_hand(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(N_IN, 5),
        nn.BatchNorm1d(5),
        nn.Softplus(),
        Residual(
            nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.ELU()),
            0.5,
        ),
        nn.Linear(5, N_OUT),
        nn.Sigmoid(),
    ).to(DT)
    return _randomize(m, seed)


# name -> (builder, error, modes); a mode is "plain", "coupled" or "frozen"
CASES = {
    "mlp_tanh": (_mlp_tanh, "dot", ["plain", "coupled"]),
    "hand_ln": (_hand_ln, "kl", ["plain"]),
    "bn_eval": (_bn_eval, "dot", ["plain"]),
    "bn_mlp": (_bn_mlp, "dot", ["coupled", "frozen"]),
    "bn_hand": (_bn_hand, "kl", ["coupled", "frozen"]),
}
PARAMS = [(name, mode) for name, (_, _, modes) in CASES.items() for mode in modes]


def _data(error: str, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(D, B, N_IN, generator=g, dtype=DT)
    if error == "dot":
        y = torch.randn(D, B, N_OUT, generator=g, dtype=DT)
    else:
        y = torch.randint(0, N_OUT, (D, B), generator=g)
    return x, y


def _problem(model, x, y, error, mode):
    return Problem(
        program=compile_model(model),
        x=x,
        y=y,
        error=error,
        coupled=mode == "coupled",
        frozen=mode == "frozen",
    )


def _perturbed(model, seed):
    init = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in init.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=g, dtype=DT))
    return init


# ----------------------------------------------------------------------------- ground truth


def _leaves(module):
    if isinstance(module, nn.Sequential):
        return [leaf for m in module for leaf in _leaves(m)]
    return [module]


def _split(model):
    """Layers in model order: a layer ends after each activation, each Residual, and at the end."""
    layers, cur = [], []
    for leaf in _leaves(model):
        cur.append(leaf)
        if isinstance(leaf, ACTS + (Residual,)):
            layers.append(cur)
            cur = []
    if cur:
        layers.append(cur)
    return layers


def _batch_stats(bn):
    return bn.training or bn.running_mean is None


def _apply(mod, h, mode, stats):
    """One module on ``h [S, d]``: batch norm by its formula, everything else called as is."""
    if isinstance(mod, nn.Sequential):
        for m in mod:
            h = _apply(m, h, mode, stats)
        return h
    if isinstance(mod, Residual):
        return h + mod.scale * _apply(mod.body, h, mode, stats)
    if isinstance(mod, nn.BatchNorm1d):
        if not _batch_stats(mod):
            mean, var = mod.running_mean, mod.running_var
        elif mode in ("coupled", "record"):
            mean = h.mean(0)
            var = ((h - mean) ** 2).mean(0)
            if mode == "record":
                stats[id(mod)] = (mean.detach(), var.detach())
        else:
            assert mode == "frozen"
            mean, var = stats[id(mod)]
        out = (h - mean) / torch.sqrt(var + mod.eps)
        if mod.weight is not None:
            out = out * mod.weight + mod.bias
        return out
    return mod(h)


def _f0(error, out, y):
    if error == "dot":
        return (out * y).sum()
    return -sum(torch.log_softmax(out[i], -1)[y[i]] for i in range(out.shape[0]))


class Truth:
    """Per-datapoint layer functions of ``model`` (and ``init``) under ``mode``."""

    def __init__(self, model, x, y, error, mode, init=None):
        self.layers = _split(model)
        self.L = len(self.layers)
        assert compile_model(model).L == self.L
        self.x, self.y, self.error, self.mode = x, y, error, mode
        self.ilayers = _split(init) if init is not None else None
        self.stats = []  # per dataset: batch-norm statistics (frozen mode) of model and init
        for d in range(D):
            st = {}
            if mode == "frozen":
                h = x[d]
                for i, mods in enumerate(self.layers):
                    if self.ilayers is not None:  # the init layer on the trained input
                        self._run(self.ilayers[i], h, "record", st)
                    h = self._run(mods, h, "record", st)
            self.stats.append(st)

    def _run(self, mods, h, mode, st):
        for m in mods:
            h = _apply(m, h, mode, st)
        return h

    def datapoints(self):
        for d in range(D):
            if self.mode == "coupled":
                yield d, slice(0, B)
            else:
                for b in range(B):
                    yield d, slice(b, b + 1)

    def layer(self, d, m, init=False):
        """The function ``f_{m+1} -> f_m``."""
        mods = (self.ilayers if init else self.layers)[self.L - m]
        mode = "coupled" if self.mode == "coupled" else "frozen"
        return lambda h: self._run(mods, h, mode, self.stats[d])

    def compose(self, d, start, end):
        fns = [self.layer(d, m) for m in range(start - 1, end - 1, -1)]

        def fn(h):
            for f in fns:
                h = f(h)
            return h

        return fn

    def to_error(self, d, rows, start):
        f = self.compose(d, start, 1)
        return lambda h: _f0(self.error, f(h), self.y[d, rows])

    def outputs(self, d, rows):
        fs = {self.L + 1: self.x[d, rows]}
        for m in range(self.L, 0, -1):
            fs[m] = self.layer(d, m)(fs[m + 1])
        return fs


def _jac_matrix(fn, h):
    out = fn(h)
    return jacrev(fn)(h).reshape(out.numel(), h.numel())


def _close(actual, expected, rtol=1e-10, atol=0.0):
    """Same shape and NaN pattern; finite entries equal to ``rtol`` (relative to the largest)."""
    expected = torch.as_tensor(expected, dtype=DT).detach()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == DT
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), (actual, expected)
    a, e = actual[~nan], expected[~nan]
    scale = e.abs().max() if e.numel() else 0.0
    tol = rtol * (e.abs() + 1e-2 * scale) + atol + 1e-300
    assert torch.all((a - e).abs() <= tol), (actual, expected)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name,mode", PARAMS)
def test_sweep(name, mode):
    build, error, _ = CASES[name]
    model = build()
    x, y = _data(error)
    pb = _problem(model, x, y, error, mode)
    sw = ReferenceBackend().sweep(pb, grads=True, stats=True)
    tr = Truth(model, x, y, error, mode)
    L = tr.L
    sq_out, sq_grad = [], []
    for d, rows in tr.datapoints():
        fs = tr.outputs(d, rows)
        f0 = _f0(error, fs[1], y[d, rows])
        sq_out.append([f0.item() ** 2] + [fs[l].square().sum().item() for l in range(1, L + 1)])
        sq_grad.append(
            [1.0]
            + [grad(tr.to_error(d, rows, l))(fs[l]).square().sum().item() for l in range(1, L + 1)]
        )
    _close(sw.sq_out, sq_out)
    _close(sw.sq_grad, sq_grad)

    # moments of the pre-activations over all samples of all datasets
    assert len(sw.moments) == L + 1 and sw.moments[0] is None
    for m in range(1, L + 1):
        mods = tr.layers[L - m]
        if not isinstance(mods[-1], ACTS):
            assert sw.moments[m] is None
            continue
        zs = []
        for d, rows in tr.datapoints():
            h = tr.outputs(d, rows)[m + 1]
            zs.append(
                tr._run(mods[:-1], h, "coupled" if mode == "coupled" else "frozen", tr.stats[d])
            )
        z = torch.cat(zs)
        mo = sw.moments[m]
        assert mo.count == D * B == z.shape[0]
        _close(mo.mean, z.mean(0), atol=1e-12 * z.abs().max().item())  # BN: mean 0
        _close(torch.sqrt(mo.m2 / mo.count), torch.std(z, 0, unbiased=False))
        assert torch.equal(mo.pos, (z > 0).sum(0).to(DT))
        assert torch.equal(mo.neg, (z < 0).sum(0).to(DT))


@pytest.mark.parametrize("with_probes", [False, True])
@pytest.mark.parametrize("name,mode", PARAMS)
def test_chain(name, mode, with_probes):
    build, error, _ = CASES[name]
    model = build()
    x, y = _data(error)
    pb = _problem(model, x, y, error, mode)
    tr = Truth(model, x, y, error, mode)
    L, S, w = tr.L, pb.S, pb.widths
    probes, V = None, {}
    if with_probes:
        g = torch.Generator().manual_seed(3)
        V = {l: torch.randn(4, S, w[l], generator=g, dtype=DT) for l in range(1, L + 1)}
        probes = V.__getitem__
    got = ReferenceBackend().chain(pb, probes)
    want = torch.full((pb.P, L + 1, L + 1), math.nan, dtype=DT)
    for p, (d, rows) in enumerate(tr.datapoints()):
        fs = tr.outputs(d, rows)
        want[p, 0, 0] = 1.0
        for k in range(1, L + 1):
            want[p, k, 0] = grad(tr.to_error(d, rows, k))(fs[k]).square().sum()
            for l in range(1, k + 1):
                J = _jac_matrix(tr.compose(d, k, l), fs[k])
                if k == l:
                    assert torch.equal(J, torch.eye(S * w[l], dtype=DT))
                if with_probes:
                    Vf = V[l].reshape(V[l].shape[0], -1)
                    want[p, k, l] = (Vf @ J).square().sum() / Vf.shape[0]
                else:
                    want[p, k, l] = J.square().sum()
    _close(got, want)
    if not with_probes:
        for l in range(1, L + 1):
            assert torch.all(got[:, l, l] == S * w[l])


@pytest.mark.parametrize("name,mode", PARAMS)
def test_jacobian(name, mode):
    build, error, _ = CASES[name]
    model = build()
    x, y = _data(error)
    pb = _problem(model, x, y, error, mode)
    tr = Truth(model, x, y, error, mode)
    L, S, w = tr.L, pb.S, pb.widths
    be = ReferenceBackend()
    for start in range(1, L + 2):
        for end in range(1, min(start, L) + 1):
            got = be.jacobian(pb, start, end)
            assert got.shape == (pb.P, S * w[end], S * w[start])
            want = []
            for d, rows in tr.datapoints():
                h = tr.outputs(d, rows)[start]
                want.append(_jac_matrix(tr.compose(d, start, end), h))
            _close(got, torch.stack(want))

    # the whole model, input -> output, without the layer split
    got = be.jacobian(pb, L + 1, 1)
    if mode == "plain":  # no batch statistics: the model itself, vectorized over samples
        per_sample = vmap(jacrev(lambda v: model(v[None])[0]))(x.reshape(-1, N_IN))
        _close(got, per_sample)
    elif mode == "coupled":  # the whole-batch function, batch norm by its formula
        for d in range(D):
            J = jacrev(lambda X: _apply(model, X, "coupled", {}))(x[d])
            _close(got[d], J.reshape(B * N_OUT, B * N_IN))


@pytest.mark.parametrize("name,mode", PARAMS)
def test_contributions(name, mode):
    build, error, _ = CASES[name]
    model = build()
    init = _perturbed(model, 11)
    x, y = _data(error)
    pb = _problem(model, x, y, error, mode)
    be = ReferenceBackend()
    got = be.contributions(pb, compile_model(init))
    tr = Truth(model, x, y, error, mode, init=init)
    L = tr.L
    assert L <= 4
    want = torch.full((pb.P, L + 1, L + 1), math.nan, dtype=DT)
    for p, (d, rows) in enumerate(tr.datapoints()):
        fs = tr.outputs(d, rows)
        G0 = grad(tr.to_error(d, rows, 1))(fs[1]).reshape(1, -1)
        G = {m: _jac_matrix(tr.layer(d, m), fs[m + 1]) for m in range(1, L)}
        Sm = {m: _jac_matrix(tr.layer(d, m, init=True), fs[m + 1]) for m in range(1, L)}
        want[p, 0, 0] = 1.0
        for l in range(1, L + 1):
            for lam in range(l):  # every product G0 X_1 ... X_{l-1} with lam factors R
                total = 0
                for Rset in itertools.combinations(range(1, l), lam):
                    v = G0
                    for m in range(1, l):
                        v = v @ ((G[m] - Sm[m]) if m in Rset else Sm[m])
                    total = total + v
                want[p, l, lam] = total.square().sum() if torch.is_tensor(total) else 0.0
            # the terms add up to the full gradient
            full = G0
            for m in range(1, l):
                full = full @ G[m]
            g_l = grad(tr.to_error(d, rows, l))(fs[l]).reshape(1, -1)
            _close(full, g_l)
    _close(got, want)

    # model == init: everything is in lam = 0, which is the gradient
    same = be.contributions(pb, compile_model(copy.deepcopy(model)))
    sq_grad = be.sweep(pb, grads=True, stats=False).sq_grad
    for l in range(2, L + 1):  # (exactly 0 up to roundoff in recomputed frozen statistics)
        assert torch.all(same[:, l, 1:l] <= 1e-24 * same[:, l, :1])
    _close(same[:, :, 0], sq_grad)


@pytest.mark.parametrize("name,mode", PARAMS)
def test_model_unchanged(name, mode):
    build, error, _ = CASES[name]
    model = build()
    init = _perturbed(model, 5)
    for m in (model, init):  # running statistics that a train-mode pass would move
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None:
                with torch.no_grad():
                    bn.running_mean.fill_(0.25)
                    bn.running_var.fill_(2.0)
    snap = [
        (
            {k: v.clone() for k, v in m.state_dict().items()},
            [mod.training for mod in m.modules()],
            [p.requires_grad for p in m.parameters()],
        )
        for m in (model, init)
    ]
    x, y = _data(error)
    pb = _problem(model, x, y, error, mode)
    be = ReferenceBackend()
    be.sweep(pb, grads=True, stats=True)
    be.chain(pb, None)
    be.jacobian(pb, pb.L + 1, 1)
    be.contributions(pb, compile_model(init))
    for m, (state, flags, req) in zip((model, init), snap):
        now = m.state_dict()
        assert state.keys() == now.keys()
        for k in state:
            assert torch.equal(state[k], now[k]), k
        assert [mod.training for mod in m.modules()] == flags
        assert [p.requires_grad for p in m.parameters()] == req
        assert all(p.grad is None for p in m.parameters())


def test_without_error_and_validation():
    model = _mlp_tanh()
    x, _ = _data("dot")
    pb = Problem(program=compile_model(model), x=x, y=None, error=None, coupled=False, frozen=False)
    be = ReferenceBackend()
    sw = be.sweep(pb, grads=False, stats=False)
    assert sw.sq_grad is None and sw.moments is None
    assert torch.isnan(sw.sq_out[:, 0]).all() and not torch.isnan(sw.sq_out[:, 1:]).any()
    ch = be.chain(pb, None)
    assert torch.all(ch[:, 0, 0] == 1) and torch.isnan(ch[:, 1:, 0]).all()
    assert not torch.isnan(ch[:, 1:, 1:].tril()).any()

    # train-mode batch norm needs batch datapoints or frozen statistics
    bad = _problem(_bn_mlp(), x, torch.zeros(D, B, N_OUT, dtype=DT), "dot", "plain")
    with pytest.raises(ValueError):
        be.sweep(bad, grads=False, stats=False)


def test_frozen_equals_batch_values():
    """Frozen statistics are those of the dataset's batch: same forward values as coupled."""
    model = _bn_hand()
    x, y = _data("kl")
    be = ReferenceBackend()
    a = be.sweep(_problem(model, x, y, "kl", "frozen"), grads=False, stats=True)
    b = be.sweep(_problem(model, x, y, "kl", "coupled"), grads=False, stats=True)
    _close(a.sq_out[:, 1:].reshape(D, B, -1).sum(1), b.sq_out[:, 1:])
    for ma, mb in zip(a.moments, b.moments):
        assert (ma is None) == (mb is None)
        if ma is not None:
            _close(ma.mean, mb.mean)
            _close(ma.m2, mb.m2)
