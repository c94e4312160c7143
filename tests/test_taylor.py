from __future__ import annotations

import copy

import torch

import gscfast
from gscfast.taylor import taylor_curve, weight_change_norms


def data(n=200, d=12, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, c, (n,), generator=g
    )


def test_k0_is_the_model_itself_and_linear_models_reduce_exactly():
    x, y = data()
    model = gscfast.mlp(
        5, 12, act="tanh", norm="batch", out_features=4, seed=0, dtype=torch.float64
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = taylor_curve(model, x, x, y)
    with torch.no_grad():
        out = copy.deepcopy(model).eval()(x)
    assert torch.allclose(
        curve["loss"][0], torch.nn.functional.cross_entropy(out, y, reduction="mean").double()
    )
    assert curve["error_rate"][0] == (out.argmax(1) != y).double().mean()
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lin = gscfast.mlp(4, 12, act="identity", out_features=4, bias=True, seed=1, dtype=torch.float64)
    c = taylor_curve(lin, x, x, y)  # an affine model is its own Taylor expansion
    assert torch.allclose(c["loss"], c["loss"][0].expand(6), rtol=1e-12)


def test_weight_change_norms():
    a = gscfast.mlp(3, 6, act="relu", out_features=2, seed=0, dtype=torch.float64)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[2].weight.add_(torch.eye(6, dtype=torch.float64) * 0.5)
    n = weight_change_norms(b, a)
    assert torch.isnan(n[0]) and n.shape == (5,)  # model[2] is the second layer: f_3
    assert torch.allclose(
        n[1:], torch.tensor([0.0, 0.0, 0.5, 0.0], dtype=torch.float64), atol=1e-12
    )
