"""``layers=``: GSC(l, 0) of any model at named boundaries (issue 14, item 3, for ``gsc`` and
``gsc_moments``). On MLPs it equals the compiled path; on a non-Sequential CNN with residual
blocks it equals a hand-written autograd computation, one sample at a time; boundaries that do
not cut the graph, and everything else that would make the number not the defined one, are
refused naming the module."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import cases
from torch import nn

import gscfast

F64 = torch.float64


class Block(nn.Module):
    """A residual block: ``relu(x + conv(relu(bn(conv(x)))))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, dtype=F64)
        self.bn = nn.BatchNorm2d(c, dtype=F64)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, dtype=F64)
        self.out = nn.Tanh()

    def forward(self, x):
        return self.out(x + self.conv2(self.act(self.bn(self.conv1(x)))))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, dtype=F64)
        self.stem_act = nn.ReLU()
        self.block1 = Block(4)
        self.block2 = Block(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 5, dtype=F64)

    def forward(self, x):
        h = self.block2(self.block1(self.stem_act(self.stem(x))))
        return self.head(self.pool(h).flatten(1))


BOUNDARIES = ["stem_act", "block1", "block2", "pool"]


def _resnet(train: bool) -> ResNet:
    torch.manual_seed(0)
    model = ResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.train(train)


def _data(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 5, 5, generator=g, dtype=F64), torch.randn(
        B, 5, generator=g, dtype=F64
    )


def _by_hand(model, x, y, names, datapoints):
    """definitions.md written out: per datapoint, autograd through forward hooks."""
    o2, g2, n = [], [], None
    for rows in datapoints:
        seen = {}
        m = copy.deepcopy(model)  # its running statistics may move; the caller's do not
        mods = dict(m.named_modules())
        for k in names:
            mods[k].register_forward_hook(lambda mm, a, o, k=k, seen=seen: seen.__setitem__(k, o))
        out = m(x[rows])
        f0 = (out * y[rows]).sum()
        fs = [out, *(seen[k] for k in reversed(names))]
        gs = torch.autograd.grad(f0, fs)
        o2.append([f0.item() ** 2, *(f.detach().square().sum().item() for f in fs)])
        g2.append([1.0, *(g.square().sum().item() for g in gs)])
        n = [1, *(f.numel() for f in fs)]
    o2, g2 = torch.tensor(o2, dtype=F64).mean(0), torch.tensor(g2, dtype=F64).mean(0)
    out = g2 / torch.tensor(n, dtype=F64) * o2 / o2[0]
    out[0] = 1
    return out


def test_mlp_equals_the_compiled_path():
    x, y = torch.randn(40, 8, dtype=F64), torch.randn(40, 8, dtype=F64)
    for norm in (None, "layer", "batch"):
        model = gscfast.mlp(5, 8, act="tanh", norm=norm, out_features=8, seed=0, dtype=F64)
        names = [k for k, m in model.named_modules() if isinstance(m, nn.Tanh)]
        got = gscfast.gsc(model, x, y, layers=names, chunk_size=7)
        torch.testing.assert_close(got, gscfast.gsc(model, x, y), rtol=1e-10, atol=1e-13)
        mo = gscfast.gsc_moments(model, x, y, layers=names)
        torch.testing.assert_close(mo.gsc(), gscfast.gsc_moments(model, x, y).gsc())
        per = gscfast.gsc(model, x, y, layers=names, reduction="none")
        want = gscfast.gsc(model, x, y, reduction="none")
        torch.testing.assert_close(per, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("train", [False, True])
def test_resnet_equals_autograd_by_hand(train):
    model, (x, y) = _resnet(train), _data()
    before = copy.deepcopy(model.state_dict())
    got = gscfast.gsc(model, x, y, layers=BOUNDARIES, chunk_size=4)
    # eval mode: one sample per datapoint; train-mode BatchNorm2d: the batch is the datapoint
    datapoints = [slice(0, len(x))] if train else [slice(i, i + 1) for i in range(len(x))]
    torch.testing.assert_close(
        got, _by_hand(model, x, y, BOUNDARIES, datapoints), rtol=1e-9, atol=0
    )
    for k, v in model.state_dict().items():  # running statistics untouched, hooks removed
        assert torch.equal(v, before[k]), k
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "layers, kw, error, match",
    [
        (["block1.conv2"], {}, ValueError, r"'block1.conv2'.*bypasses it \(through 'block1.out'"),
        (["block1.act"], {}, ValueError, r"'block1.act'.*bypasses it"),
        (["nope"], {}, ValueError, r"'nope', which is not a submodule"),
        (["block2", "block1"], {}, ValueError, r"in the order the forward computes them"),
        (["head"], {}, ValueError, r"'head', whose output is the model's output"),
        (["block1"], {"backend": "torch"}, ValueError, r"backend must be 'auto'"),
        ("block1", {}, TypeError, r"list of module names"),
    ],
)
def test_refusals(layers, kw, error, match):
    model, (x, y) = _resnet(False), _data()
    with pytest.raises(error, match=match):
        gscfast.gsc(model, x, y, layers=layers, **kw)


def test_refusals_of_the_model():
    x, y = _data()
    drop = _resnet(False)
    drop.pool = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Dropout(0.2).train())
    with pytest.raises(ValueError, match=r"pool.1 \(Dropout\) is in train mode"):
        gscfast.gsc(drop, x, y, layers=BOUNDARIES)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5, dtype=F64)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    with pytest.raises(ValueError, match=r"'lin', which runs 2 times"):
        gscfast.gsc(
            Twice(), torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64), layers=["lin"]
        )

    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5, dtype=F64)
            self.act = nn.Tanh()

        def forward(self, x):
            h = self.act(self.lin(x))
            return h - h.mean(0)

    with pytest.raises(ValueError, match=r"couples the samples of a batch"):
        gscfast.gsc(
            Centered(), torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64), layers=["act"]
        )


def test_frozen_batch_statistics_per_sample():
    """``batchnorm="frozen"``: the batch's statistics held constant (``freeze_batchnorm``, per
    channel for ``BatchNorm2d``), one sample per datapoint."""
    model, (x, y) = _resnet(True), _data()
    frozen = gscfast.nn.freeze_batchnorm(model, x)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), copy.deepcopy(model)(x))  # the same function on x
    got = gscfast.gsc(model, x, y, layers=BOUNDARIES, batchnorm="frozen")
    want = _by_hand(frozen, x, y, BOUNDARIES, [slice(i, i + 1) for i in range(len(x))])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_bad_values_and_options_are_refused():
    """Non-finite inputs and targets, an unknown batchnorm mode, and an overflow inside the model
    (float32): a clear error, never a NaN result (nor a misleading "random module")."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    names = ["1", "3"]
    with pytest.raises(ValueError, match=r"x contains NaN at index \(2, 1\)"):
        gscfast.gsc(
            mlp,
            x.index_put((torch.tensor(2), torch.tensor(1)), torch.tensor(float("nan"))),
            y,
            layers=names,
        )
    with pytest.raises(ValueError, match=r"y contains Inf"):
        gscfast.gsc(mlp, x, y * 1e39, layers=names)
    with pytest.raises(
        ValueError, match=r"batchnorm must be one of \('batch', 'frozen'\), got 'nope'"
    ):
        gscfast.gsc(mlp, x, y, layers=names, batchnorm="nope")
    with torch.no_grad():
        mlp[2].weight.mul_(1e20)  # f_2 ~ 1e20 is finite, f_1 ~ 1e40 overflows float32
        mlp[4].weight.mul_(1e20)
    with pytest.raises(
        ValueError, match=r"stop being finite .* torch.float32 at the model's output f_1"
    ):
        gscfast.gsc(mlp, x, y, layers=names)
    assert torch.isfinite(gscfast.gsc(mlp.double(), x.double(), y.double(), layers=names)).all()
    with torch.no_grad():
        mlp[0].weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"0.weight contains Inf at index \(1, 2\)"):
        gscfast.gsc(mlp, x.double(), y.double(), layers=names)


# ----------------------------------------------------------------------------- gsc_matrix
def test_gsc_matrix_of_an_mlp_equals_the_compiled_path():
    """Exact and sketched (the same generator gives the same probes), per sample, with batch
    statistics coupling the batch, and frozen."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 6, generator=g, dtype=F64), torch.randn(12, 6, generator=g, dtype=F64)
    for norm, bn in ((None, "batch"), ("batch", "batch"), ("batch", "frozen"), ("layer", "batch")):
        model = gscfast.mlp(4, 6, act="tanh", norm=norm, out_features=6, seed=0, dtype=F64)
        names = [k for k, m in model.named_modules() if isinstance(m, nn.Tanh)]
        got = gscfast.gsc_matrix(model, x, y, batchnorm=bn, layers=names, chunk_size=5)
        want = gscfast.gsc_matrix(model, x, y, batchnorm=bn)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, equal_nan=True)
        kw = {"batchnorm": bn, "method": "sketch", "probes": 5}
        got = gscfast.gsc_matrix(
            model, x, y, layers=names, generator=torch.Generator().manual_seed(3), **kw
        )
        want = gscfast.gsc_matrix(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, equal_nan=True)


def _matrix_by_hand(model: ResNet, x, y) -> torch.Tensor:
    """GSC(k, l) of the eval-mode ResNet at BOUNDARIES, one sample at a time, each J_k^l the
    torch.func.jacrev of the model's code between the two boundaries."""
    segments = [  # f_5 -> f_4 -> ... -> f_1: block1, block2, pool, head
        model.block1,
        model.block2,
        model.pool,
        lambda h: model.head(h.flatten(1)),
    ]
    L = len(segments) + 1
    sq = torch.zeros(L + 1, L + 1, dtype=F64)
    f2 = torch.zeros(L + 1, dtype=F64)
    n = torch.zeros(L + 1, dtype=F64)
    for i in range(len(x)):
        h = model.stem_act(model.stem(x[i : i + 1]))
        fs = {L: h}
        for j, seg in enumerate(segments):
            fs[L - 1 - j] = seg(fs[L - j]).detach()
        f0 = (fs[1] * y[i : i + 1]).sum()
        fs[0] = f0.detach()
        for k in range(L + 1):
            f2[k] += fs[k].square().sum() / len(x)
            n[k] = fs[k].numel()
        for k in range(1, L + 1):
            for l in range(0, k):
                segs = segments[L - k : L - l] if l > 0 else segments[L - k :]

                def chain(t, segs=segs, l=l, yi=y[i : i + 1]):
                    for s in segs:
                        t = s(t)
                    return (t * yi).sum() if l == 0 else t

                J = torch.func.jacrev(chain)(fs[k])
                sq[k, l] += J.square().sum() / len(x)
    n[0] = 1
    res = sq / n[:, None] * f2[:, None] / f2[None, :]
    res.diagonal().fill_(1)
    return res.masked_fill(torch.ones_like(res, dtype=torch.bool).triu(1), float("nan"))


def test_gsc_matrix_of_a_resnet_equals_jacobians_by_hand():
    model, (x, y) = _resnet(False), _data(B=4)
    got = gscfast.gsc_matrix(model, x, y, layers=BOUNDARIES, chunk_size=3)
    want = _matrix_by_hand(model, x, y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0, equal_nan=True)
    # the sketch estimates it (unbiased; 300 probes: within a few percent here)
    sk = gscfast.gsc_matrix(
        model,
        x,
        y,
        layers=BOUNDARIES,
        method="sketch",
        probes=300,
        generator=torch.Generator().manual_seed(0),
    )
    low = torch.ones_like(want, dtype=torch.bool).tril()
    assert ((sk[low] / want[low] - 1).abs() < 0.25).all()
    assert not torch.equal(sk[low], want[low])


def test_gsc_matrix_refuses_as_gsc_does():
    model, (x, y) = _resnet(False), _data()
    with pytest.raises(ValueError, match=r"'block1.conv2'.*bypasses it"):
        gscfast.gsc_matrix(model, x, y, layers=["block1.conv2"])
    with pytest.raises(ValueError, match="backend must be 'auto'"):
        gscfast.gsc_matrix(model, x, y, layers=BOUNDARIES, backend="torch")
    with pytest.raises(ValueError, match="probes must be a positive int"):
        gscfast.gsc_matrix(model, x, y, layers=BOUNDARIES, method="sketch", probes=0)


# ----------------------------------------------------------------------------- pre-activations
def test_preactivation_stats_of_an_mlp_equal_the_compiled_path():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 8, generator=g, dtype=F64)
    for norm, bn in ((None, "batch"), ("batch", "batch"), ("batch", "frozen"), ("layer", "batch")):
        model = gscfast.mlp(5, 8, act="tanh", norm=norm, out_features=8, seed=0, dtype=F64)
        names = [k for k, m in model.named_modules() if isinstance(m, nn.Tanh)]
        got = gscfast.preactivation_stats(model, x, batchnorm=bn, layers=names, chunk_size=7)
        want = gscfast.preactivation_stats(model, x, batchnorm=bn)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, equal_nan=True)


def test_preactivation_stats_of_a_resnet_by_hand():
    """The input of the last activation run within each named module: stem_act's own input,
    each block's final Tanh (after the residual sum); none within the pooling (NaN)."""
    model, (x, _) = _resnet(False), _data(B=9)
    got = gscfast.preactivation_stats(model, x, layers=BOUNDARIES, chunk_size=4)
    seen = {}
    hooks = [
        model.stem_act.register_forward_pre_hook(lambda m, a: seen.__setitem__(5, a[0])),
        model.block1.out.register_forward_pre_hook(lambda m, a: seen.__setitem__(4, a[0])),
        model.block2.out.register_forward_pre_hook(lambda m, a: seen.__setitem__(3, a[0])),
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for l in range(6):
        if l not in seen:
            assert got.std[l].isnan() and got.sign_diversity[l].isnan(), l
            continue
        z = seen[l].reshape(len(x), -1)  # every element a neuron
        std = z.var(0, correction=0).mean().sqrt()
        pos, neg = (z > 0).sum(0).double(), (z < 0).sum(0).double()
        div = (torch.minimum(pos, neg) / (pos + neg)).mean()
        torch.testing.assert_close(got.std[l], std, rtol=1e-10, atol=0)
        torch.testing.assert_close(got.sign_diversity[l], div, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- jacobian
def test_jacobian_of_an_mlp_equals_the_compiled_path():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 8, generator=g, dtype=F64)
    for norm, bn in ((None, "batch"), ("batch", "frozen"), ("layer", "batch")):
        model = gscfast.mlp(4, 8, act="tanh", norm=norm, out_features=3, seed=0, dtype=F64)
        names = [k for k, m in model.named_modules() if isinstance(m, nn.Tanh)]
        for start, end in ((None, None), (5, 1), (4, 2), (3, 3), (None, 4)):
            kw = {"start": start, "end": end, "batchnorm": bn}
            got = gscfast.jacobian(model, x, layers=names, chunk_size=4, **kw)
            torch.testing.assert_close(
                got, gscfast.jacobian(model, x, **kw), rtol=1e-10, atol=1e-13
            )


def test_jacobian_of_a_resnet_equals_jacrev():
    model, (x, _) = _resnet(False), _data(B=5)
    got = gscfast.jacobian(model, x, layers=BOUNDARIES, chunk_size=3)  # input -> output
    want = torch.func.vmap(torch.func.jacrev(model))(x[:, None]).reshape(5, 5, -1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    # f_4 (block1's output) -> f_2 (the pooling's): block2 then the pooling, one sample at a time
    got = gscfast.jacobian(model, x, layers=BOUNDARIES, start=4, end=2)
    with torch.no_grad():
        f4 = model.block1(model.stem_act(model.stem(x)))
    for i in range(len(x)):
        J = torch.func.jacrev(lambda t: model.pool(model.block2(t)))(f4[i : i + 1])
        torch.testing.assert_close(got[i], J.reshape(16, 100), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="per-sample Jacobians are not defined"):
        gscfast.jacobian(_resnet(True), x, layers=BOUNDARIES)  # batch statistics couple
    frozen = gscfast.jacobian(_resnet(True), x, layers=BOUNDARIES, batchnorm="frozen")
    assert frozen.shape == (5, 5, 75) and torch.isfinite(frozen).all()
    with pytest.raises(ValueError, match="start .* must be an earlier layer than end"):
        gscfast.jacobian(model, x, layers=BOUNDARIES, start=2, end=4)


# ----------------------------------------------------------------------------- effective depth
def _trained(model: nn.Module, seed: int = 7) -> nn.Module:
    """``model`` with its parameters moved as training would (a copy)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype) * p.abs().mean())
    return out


def test_effective_depth_of_an_mlp_equals_the_compiled_path():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(11, 8, generator=g, dtype=F64), torch.randn(11, 3, generator=g, dtype=F64)
    cases = [(None, False, "batch"), ("layer", False, "batch"), (None, True, "batch")]
    cases += [("batch", False, "batch"), ("batch", False, "frozen"), ("batch", True, "frozen")]
    for norm, residual, bn in cases:
        init = gscfast.mlp(
            5, 8, act="tanh", norm=norm, residual=residual, out_features=3, seed=0, dtype=F64
        )
        model = _trained(init)
        names = [k for k, m in model.named_modules() if isinstance(m, (nn.Tanh, gscfast.Residual))]
        names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost
        kw = {"batchnorm": bn}
        d, prof = gscfast.effective_depth(model, init, x, y, layers=names, chunk_size=4, **kw)
        d_want, prof_want = gscfast.effective_depth(model, init, x, y, **kw)
        assert d == d_want, (norm, residual, bn)
        torch.testing.assert_close(prof, prof_want, rtol=1e-10, atol=1e-13, equal_nan=True)
        d0, _ = gscfast.effective_depth(init, init, x, y, layers=names, **kw)
        assert d0 == 0


def test_effective_depth_of_a_resnet_by_hand():
    """The residual trick written out with torch.func.jacrev of each layer's code, trained and
    initial parameters, one sample at a time."""
    init, (x, y) = _resnet(False), _data(B=3)
    model = _trained(init)
    _, prof = gscfast.effective_depth(model, init, x, y, layers=BOUNDARIES)

    def segments(m):  # the layers that output f_4, f_3, f_2, f_1
        return [m.block1, m.block2, m.pool, lambda h: m.head(h.flatten(1))]

    L = 5
    sq = torch.zeros(L + 1, L + 1, dtype=F64)
    for i in range(len(x)):
        fs = {L: model.stem_act(model.stem(x[i : i + 1])).detach()}
        for j, seg in enumerate(segments(model)):
            fs[L - 1 - j] = seg(fs[L - j]).detach()
        g = [y[i].reshape(1, -1)]  # g_1^(0) = d <y, f_1> / d f_1
        sq[1, 0] += g[0].square().sum() / len(x)
        for m in range(1, L):  # G_m = d f_m / d f_{m+1}; S_m with init's parameters
            seg_t, seg_i = segments(model)[L - 1 - m], segments(init)[L - 1 - m]
            G = torch.func.jacrev(seg_t)(fs[m + 1]).reshape(fs[m].numel(), -1)
            S = torch.func.jacrev(seg_i)(fs[m + 1]).reshape(fs[m].numel(), -1)
            nxt = [g[0] @ S] + [g[k] @ S + g[k - 1] @ (G - S) for k in range(1, len(g))]
            g = [*nxt, g[-1] @ (G - S)]
            for lam, v in enumerate(g):
                sq[m + 1, lam] += v.square().sum() / len(x)
    want = sq.sqrt()
    want[0, 0] = 1
    mask = torch.ones_like(want, dtype=torch.bool)
    for l in range(L + 1):
        mask[l, : max(l - 1, 0) + 1] = False
    want[mask] = float("nan")
    torch.testing.assert_close(prof, want, rtol=1e-9, atol=1e-14, equal_nan=True)


def test_analyze_with_layers_is_gsc_and_preactivation_stats():
    model, (x, y) = _resnet(False), _data()
    a = gscfast.analyze(model, x, y, layers=BOUNDARIES)
    torch.testing.assert_close(a.gsc, gscfast.gsc(model, x, y, layers=BOUNDARIES))
    stats = gscfast.preactivation_stats(model, x, layers=BOUNDARIES)
    torch.testing.assert_close(a.preact_std, stats.std, equal_nan=True)
    torch.testing.assert_close(a.sign_diversity, stats.sign_diversity, equal_nan=True)
    assert a.rate == gscfast.explosion_rate(a.gsc)


# ----------------------------------------------------------------------------- random models
def _boundary_names(model: nn.Module) -> list[str]:
    """The compiled layer boundaries of a Sequential as ``named_modules()`` names: the module
    that ends each layer but the last (its output is f_1)."""
    program = gscfast.compile_model(model)
    paths = [layer.ops[-1].path for layer in program.layers[:-1]]
    return [re.sub(r"\[(\d+)\]", r".\1", p).removeprefix("model.") for p in paths]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), bn=st.sampled_from(["batch", "frozen"]))
def test_random_mlps_equal_the_compiled_path_in_every_function(data, bn):
    """Every function with layers= at the compiled boundaries equals the compiled path on
    random models (norms, residual blocks, nested Sequentials, batch norm in both modes)."""
    case = data.draw(cases(max_depth=6, max_width=10, datasets=False))
    model, x, y = case.model, case.x, case.y
    names = _boundary_names(model)
    assume(names)  # one layer: no boundary to name
    kw = {"batchnorm": bn}
    close = {"rtol": 1e-9, "atol": 1e-12, "equal_nan": True}
    torch.testing.assert_close(
        gscfast.gsc(model, x, y, layers=names, **kw), gscfast.gsc(model, x, y, **kw), **close
    )
    torch.testing.assert_close(
        gscfast.gsc_matrix(model, x, y, layers=names, **kw),
        gscfast.gsc_matrix(model, x, y, **kw),
        **close,
    )
    got, want = (
        gscfast.preactivation_stats(model, x, layers=names, **kw),
        gscfast.preactivation_stats(model, x, **kw),
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a[2:], b[2:], **close)  # f_1 is NaN with layers=
    init = _trained(model, seed=3)
    torch.testing.assert_close(
        gscfast.effective_depth(model, init, x, y, layers=names, **kw)[1],
        gscfast.effective_depth(model, init, x, y, **kw)[1],
        **close,
    )
    if bn == "frozen" or not case.couples:
        torch.testing.assert_close(
            gscfast.jacobian(model, x, layers=names, batchnorm="frozen"),
            gscfast.jacobian(model, x, batchnorm="frozen"),
            **close,
        )


def test_effective_depth_with_layers_refuses_what_gsc_refuses():
    """Values that overflow or underflow float32 inside: refused, not a profile. Before,
    weights scaled by 1e13 (the output overflows) gave c(3, 0) = 2.2e26 where float64 gives
    3.2e26, with no error."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    for scale, match in ((1e13, "stop being finite"), (1e-14, "underflow")):
        model = gscfast.mlp(3, 6, act="relu", seed=0)
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(scale)
        with pytest.raises(gscfast.NumericalError, match=match):
            gscfast.effective_depth(model, copy.deepcopy(model), x, y, layers=["1", "3"])
        if scale > 1:  # no squared norms there: only the overflow shows
            with pytest.raises(
                gscfast.NumericalError, match="pre-activation of layer f_2, the output of '3'"
            ):
                gscfast.preactivation_stats(model, x * 1e13, layers=["1", "3"])
            with pytest.raises(gscfast.NumericalError, match="stop being finite"):
                gscfast.jacobian(model, x * 1e13, layers=["1", "3"])
