"""Bad input gets a clear error that says what and where; the model is never modified."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gscfast


@pytest.fixture
def model():
    return gscfast.mlp(3, 6, act="tanh", norm="batch", out_features=4, seed=0)


@pytest.fixture
def xy():
    return torch.randn(5, 6), torch.randn(5, 4)


def test_wrong_feature_count(model, xy):
    with pytest.raises(
        ValueError, match=r"model\[0\] \(Linear\) expects 6 features but receives 7"
    ):
        gscfast.gsc(model, torch.randn(5, 7), xy[1])


def test_wrong_target_shape(model, xy):
    with pytest.raises(ValueError, match=r"output's shape \(5, 4\), got \(5, 3\)"):
        gscfast.gsc(model, xy[0], torch.randn(5, 3))


def test_dtype_mismatch(model, xy):
    with pytest.raises(
        ValueError,
        match=r"model\[0\] \(Linear\) weight has dtype torch.float32 but x has dtype torch.float64",
    ):
        gscfast.gsc(model, xy[0].double(), xy[1].double())
    with pytest.raises(ValueError, match="y has dtype torch.float64"):
        gscfast.gsc(model, xy[0], xy[1].double())


def test_nan_and_inf_in_inputs(model, xy):
    x = xy[0].clone()
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN at index \(3, 2\)"):
        gscfast.gsc(model, x, xy[1])
    y = xy[1].clone()
    y[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"y contains Inf at index \(1, 0\)"):
        gscfast.gsc(model, xy[0], y)


def test_inf_in_weights(model, xy):
    with torch.no_grad():
        model[3].weight[2, 1] = float("inf")
    with pytest.raises(
        ValueError, match=r"model\[3\] \(Linear\) weight contains Inf at index \(2, 1\)"
    ):
        gscfast.preactivation_stats(model, xy[0])


def test_empty_batch(model):
    with pytest.raises(ValueError, match="empty"):
        gscfast.gsc(model, torch.randn(0, 6), torch.randn(0, 4))


def test_batch_of_one_with_train_batchnorm(model):
    with pytest.raises(ValueError, match="more than one sample"):
        gscfast.gsc(model, torch.randn(1, 6), torch.randn(1, 4))
    model.eval()  # running statistics: a batch of one is fine
    assert torch.isfinite(gscfast.gsc(model, torch.randn(1, 6), torch.randn(1, 4))).all()


def test_missing_y(model, xy):
    with pytest.raises(ValueError, match="error='dot' needs y"):
        gscfast.gsc(model, xy[0], None)
    with pytest.raises(ValueError, match="error='kl' needs y"):
        gscfast.gsc(model, xy[0], None, error="kl")


def test_bad_labels(model, xy):
    with pytest.raises(ValueError, match=r"label 4 at index \(2,\).*\[0, 4\)"):
        gscfast.gsc(model, xy[0], torch.tensor([0, 1, 4, 3, 0]), error="kl")
    with pytest.raises(ValueError, match="integer class labels"):
        gscfast.gsc(model, xy[0], torch.zeros(5), error="kl")


def test_model_on_another_device(model, xy):
    # meta is the only other device on a CPU-only machine; it has no values, which is what matters
    with pytest.raises(ValueError, match=r"model\[0\] \(Linear\) weight is a meta tensor"):
        gscfast.gsc(model.to("meta"), *xy)


def test_unsupported_module_is_named_with_its_position(xy):
    model = nn.Sequential(
        nn.Linear(6, 6), nn.Sequential(nn.Tanh(), nn.Dropout(0.1)), nn.Linear(6, 4)
    )
    with pytest.raises(
        ValueError, match=r"model\[1\]\[1\] \(Dropout\) is in train mode.*model.eval\(\)"
    ):
        gscfast.gsc(model, *xy)
    model[1][1].p = 0.0  # keeps every unit: the identity, measured
    assert torch.isfinite(gscfast.gsc(model, *xy)).all()
    with pytest.raises(
        ValueError, match=r"model\[0\] \(LayerNorm\) expects \[3, 2\] in its last dimensions"
    ):
        gscfast.gsc(nn.Sequential(nn.LayerNorm((3, 2))), torch.randn(4, 6), torch.randn(4, 6))


def test_bad_options(model, xy):
    for kw, msg in [
        ({"error": "mse"}, "error must be one of"),
        ({"batchnorm": "x"}, "batchnorm must be"),
        ({"backend": "nope"}, "unknown backend"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"reduction": "sum"}, "reduction"),
    ]:
        with pytest.raises(ValueError, match=msg):
            gscfast.gsc(model, *xy, **kw)
    with pytest.raises(ValueError, match="method"):
        gscfast.gsc_matrix(model, *xy, method="svd")
    with pytest.raises(ValueError, match=r"x must be \[B, n\] or \[D, B, n\]"):
        gscfast.gsc(model, torch.randn(6), xy[1])
    with pytest.raises(ValueError, match="start must be a layer index in 1..4"):
        gscfast.jacobian(model, xy[0], start=9, batchnorm="frozen")
    with pytest.raises(ValueError, match="per-sample Jacobians are not defined"):
        gscfast.jacobian(model, xy[0])


def test_init_model_must_match(model, xy):
    other = gscfast.mlp(3, 6, act="tanh", norm="batch", seed=0)  # no output layer
    with pytest.raises(ValueError, match="init_model has 3 layers"):
        gscfast.effective_depth(model, other, *xy)


def test_a_hook_on_one_model_only_is_named(model, xy):
    """Both models are the same module types and shapes, but torch calls one of them through a
    forward hook: the refusal says which module and what differs, not two identical reprs."""
    import copy

    hooked = copy.deepcopy(model)
    hooked[1].register_forward_hook(lambda mod, i, o: o * 1.0)
    what = r"model\[1\] \(BatchNorm1d\): in model it has a forward hook, in init_model it has no"
    with pytest.raises(ValueError, match=what):
        gscfast.effective_depth(hooked, model, *xy)
    with pytest.raises(ValueError, match="in model it has no hook or overridden forward, in init"):
        gscfast.effective_depth(model, hooked, *xy)


def test_model_is_never_modified(model, xy):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    gscfast.gsc(model, *xy)
    gscfast.gsc(model, *xy, batchnorm="frozen")
    gscfast.gsc_matrix(model, *xy)
    gscfast.preactivation_stats(model, xy[0])
    gscfast.effective_depth(model, model, *xy)
    gscfast.analyze(model, *xy)
    gscfast.jacobian(model, xy[0], batchnorm="frozen")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert modes == [m.training for m in model.modules()]
