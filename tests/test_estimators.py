"""The pooled expected GSC (definitions.md) and its bootstrap interval."""

from __future__ import annotations

import math

import pytest
import torch

import gscfast
from gscfast.estimators import GSCMoments, bootstrap_gsc, explosion_rates, pool


def _moments(sq_grad, sq_out, n, count=1) -> GSCMoments:
    return GSCMoments(sq_grad, sq_out, n, count)


def test_mean_of_ratios_is_ruled_by_the_smallest_f0_but_the_pooled_gsc_is_not():
    """Constructed case: 100 one-datapoint datasets whose squared error f_0^2 is a chi-square draw
    with one degree of freedom (as with batch norm and the dot error). The true expected GSC is
    E[||J||^2] / n * E||f||^2 / E[f_0^2] = 1 * 1 / 1 = 1; the mean of the per-dataset ratios is
    ruled by the draw closest to zero."""
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(100, generator=g, dtype=torch.float64).square()
    f0[7] = 1e-8  # one dataset whose error happens to be near zero
    ms = [_moments([1.0, 1.0], [float(e), 1.0], [1.0, 1.0]) for e in f0]
    mean_of_ratios = torch.stack([m.gsc() for m in ms]).mean(0)[1].item()
    pooled = pool(ms).gsc()[1].item()
    assert mean_of_ratios > 1e5  # off by orders of magnitude
    assert 0.6 < pooled < 1.6 and pooled == pytest.approx(1 / f0.mean().item(), rel=1e-12)


@pytest.mark.parametrize("norm", [None, "batch"])
def test_pooled_moments_equal_gsc_on_several_datasets_of_one_network(norm):
    """Pooling each dataset's moments is the same estimator as ``gscfast.gsc`` on ``[D, B, n]``."""
    torch.manual_seed(0)
    model = gscfast.mlp(6, 12, act="tanh", norm=norm, seed=3, dtype=torch.float64)
    x = torch.randn(4, 30, 12, dtype=torch.float64)
    y = torch.randn(4, 30, 12, dtype=torch.float64) / 10
    whole = gscfast.gsc(model, x, y, backend="reference")
    ms = [gscfast.analyze(model, x[d], y[d], backend="reference").moments for d in range(4)]
    assert torch.allclose(pool(ms).gsc(), whole, rtol=1e-12, atol=0)
    assert pool(ms).count == (4 if norm == "batch" else 120)
    # datasets of unequal size are weighted by their datapoints
    if norm is None:
        parts = [
            gscfast.analyze(model, x[0, :10], y[0, :10], backend="reference").moments,
            gscfast.analyze(model, x[0, 10:], y[0, 10:], backend="reference").moments,
        ]
        assert torch.allclose(
            pool(parts).gsc(),
            gscfast.gsc(model, x[0], y[0], backend="reference"),
            rtol=1e-12,
            atol=0,
        )


def test_bootstrap_interval_covers_the_true_value():
    """Simulation: datasets of one datapoint with a known expected GSC. The 95% bootstrap interval
    of the pooled estimate over 60 datasets covers the true value in about 95% of 300 studies."""
    g = torch.Generator().manual_seed(1)
    true_l1 = 2.0 * 3.0 / 1.0  # E a / n * E b / E c with n = 1
    hits = 0
    trials = 300
    for t in range(trials):
        a = 2.0 * torch.rand(60, generator=g, dtype=torch.float64) * 2  # E a = 2
        b = torch.distributions.Exponential(1 / 3.0).sample((60,))  # E b = 3
        c = torch.randn(60, generator=g, dtype=torch.float64).square()  # E c = 1
        ms = [
            _moments([1.0, float(ai)], [float(ci), float(bi)], [1.0, 1.0])
            for ai, bi, ci in zip(a, b, c)
        ]
        bs = bootstrap_gsc(ms, resamples=400, seed=t)
        hits += bool(bs.gsc_lo[1] <= true_l1 <= bs.gsc_hi[1])
    assert 0.85 <= hits / trials <= 0.99, hits / trials


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    ms = [_moments([1.0, 2.0 + i, 4.0 + i], [1.0 + i, 1.0, 1.0], [1.0, 2.0, 2.0]) for i in range(5)]
    a, b = bootstrap_gsc(ms, seed=3), bootstrap_gsc(ms, seed=3)
    assert torch.equal(a.gsc_lo, b.gsc_lo) and a.rate_lo == b.rate_lo
    est = pool(ms).gsc()
    assert bool((a.gsc_lo <= est).all() and (est <= a.gsc_hi).all())
    assert a.rate_lo <= explosion_rates(est).item() <= a.rate_hi
    one = bootstrap_gsc(ms[:1])  # one dataset: no spread is measurable
    assert torch.equal(one.gsc_lo, ms[0].gsc()) and torch.equal(one.gsc_hi, ms[0].gsc())


def test_explosion_rates_match_explosion_rate_per_row():
    g = torch.tensor(
        [[1.0, 2.0, 4.0, 8.0], [1.0, float("nan"), 3.0, 0.0], [1.0, 0.0, -1.0, 0.0]],
        dtype=torch.float64,
    )
    r = explosion_rates(g)
    assert r[0].item() == pytest.approx(2.0, rel=1e-12)
    assert r[1].item() == pytest.approx(math.exp(math.log(3.0) / 2), rel=1e-12)  # finite > 0 only
    assert math.isnan(r[2].item())
    assert gscfast.explosion_rate(g[0]) == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: GSCMoments([1.0, 2.0], [1.0], [1.0, 1.0], 1), "one entry per layer"),
        (lambda: GSCMoments([1.0], [1.0], [1.0], True), "count must be a positive int"),
        (lambda: GSCMoments([1.0], [1.0], [1.0], 0), "count must be a positive int"),
        (
            lambda: GSCMoments([1.0, float("nan")], [1.0, 1.0], [1.0, 1.0], 1),
            "sq_grad must hold finite",
        ),
        (lambda: GSCMoments([1.0], [-1.0], [1.0], 1), "sq_out must hold finite non-negative"),
        (
            lambda: GSCMoments.from_dict(
                {"sq_grad": [True], "sq_out": [1.0], "n": [1.0], "count": 1}
            ),
            r"'sq_grad'\[0\] is not a number",
        ),
        (lambda: pool([]), "nothing to pool"),
        (
            lambda: pool(
                [
                    _moments([1.0, 1.0], [1.0, 1.0], [1.0, 2.0]),
                    _moments([1.0, 1.0], [1.0, 1.0], [1.0, 3.0]),
                ]
            ),
            "only the same architecture",
        ),
        (lambda: bootstrap_gsc([_moments([1.0], [1.0], [1.0])], level=1.5), "level must lie in"),
    ],
)
def test_bad_input_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_pooling_something_else_is_a_type_error():
    with pytest.raises(TypeError, match=r"moments\[1\] is a Tensor, not GSCMoments"):
        pool([_moments([1.0], [1.0], [1.0]), torch.ones(2)])


def test_moments_round_trip_through_json_exactly():
    model = gscfast.mlp(3, 8, act="relu", seed=0)
    x, y = torch.randn(20, 8), torch.randn(20, 8)
    m = gscfast.analyze(model, x, y, backend="torch").moments
    back = GSCMoments.from_dict(m.to_dict())
    assert torch.equal(back.gsc(), m.gsc()) and back.count == 20
