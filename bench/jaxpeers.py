"""JAX peers of W1-W3: what a JAX user would write for the same quantities, on the same weights
and inputs as gscfast's (float32, CPU), two formulations per workload so that the report's best
peer is not a straw man.

- W1 ``gsc``: ``w1_grad`` (``jax.grad`` with respect to zero perturbations added to every layer
  output: one backward gives every ``dE/df_l``) and ``w1_vjp`` (an explicit ``jax.vjp`` chain,
  layer by layer). Both run on the whole batch, so train-mode batch norm (batch statistics: the
  coupled case) is the same function as torch's.
- W2 ``gsc_matrix`` exact: ``vmap`` over samples of the Jacobian chain from every start layer,
  written with ``lax.fori_loop`` (``w2_fori``) or ``lax.scan`` (``w2_scan``).
- W3 ``jacobian``: ``vmap(jacfwd)`` (``w3_jacfwd``) and ``vmap(jacrev)`` (``w3_jacrev``).

Every builder returns a ``Peer``: the call compiled ahead of time for its inputs (blocking until
the result is ready, so that a timing covers the work) and its compile time, measured apart.
The quantities are those of ``benchlib``'s torch baselines (definitions.md, dot error).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import torch
from benchlib import layer_modules
from jax import lax
from torch import nn

import gscfast

jax.config.update("jax_platforms", "cpu")

ACTS: dict[type, Callable] = {nn.Tanh: jnp.tanh, nn.ReLU: jax.nn.relu, nn.SELU: jax.nn.selu}


@dataclass(frozen=True)
class Peer:
    """A compiled JAX formulation bound to its inputs.

    Attributes:
        run: runs it and returns its result (a JAX array, ready: what is timed, no conversion;
            ``benchlib.as_tensor`` converts it for the checks).
        compile_s: tracing and XLA compilation, seconds (ahead of time: not in ``run``).
    """

    run: Callable[[], object]
    compile_s: float


@dataclass(frozen=True)
class _Layer:
    norm: str | None  # None, "layer" or "batch"
    eps: float
    act: Callable


def convert(model: nn.Module) -> tuple[list[_Layer], list[tuple[jax.Array, jax.Array | None]]]:
    """gscfast's layers of ``model`` (``Linear -> [LayerNorm | BatchNorm1d] -> act``) as static
    layer descriptions and their ``(W, b)`` as float32 JAX arrays. ``ValueError`` naming the
    module for anything else (affine norms, other activations, residual blocks)."""
    static, params = [], []
    for i, layer in enumerate(layer_modules(model)):
        mods = list(layer)
        if not mods or not isinstance(mods[0], nn.Linear):
            raise ValueError(f"jaxpeers: layer {i} does not start with nn.Linear: {layer}")
        lin, rest = mods[0], mods[1:]
        norm, eps = None, 0.0
        if rest and isinstance(rest[0], (nn.LayerNorm, nn.BatchNorm1d)):
            m = rest.pop(0)
            affine = m.elementwise_affine if isinstance(m, nn.LayerNorm) else m.affine
            if affine:
                raise ValueError(f"jaxpeers: layer {i}: affine {type(m).__name__} not supported")
            if isinstance(m, nn.BatchNorm1d) and not m.training:
                raise ValueError(f"jaxpeers: layer {i}: batch norm in eval mode not supported")
            norm, eps = ("layer" if isinstance(m, nn.LayerNorm) else "batch"), float(m.eps)
        if len(rest) != 1 or type(rest[0]) not in ACTS:
            raise ValueError(
                f"jaxpeers: layer {i}: expected one activation of {[t.__name__ for t in ACTS]}, "
                f"got {rest}"
            )
        static.append(_Layer(norm, eps, ACTS[type(rest[0])]))
        w = jnp.asarray(lin.weight.detach().cpu().float().numpy())
        b = None if lin.bias is None else jnp.asarray(lin.bias.detach().cpu().float().numpy())
        params.append((w, b))
    return static, params


def _apply(st: _Layer, p: tuple, h: jax.Array) -> jax.Array:
    w, b = p
    z = h @ w.T
    if b is not None:
        z = z + b
    if st.norm is not None:
        axis = -1 if st.norm == "layer" else 0  # batch norm: statistics over the batch
        mu = z.mean(axis, keepdims=True)
        var = jnp.square(z - mu).mean(axis, keepdims=True)
        z = (z - mu) * lax.rsqrt(var + st.eps)
    return st.act(z)


def _compile(fn: Callable, *args) -> Peer:
    """``fn`` traced and compiled ahead of time for ``args`` (timed apart: ``compile_s``), bound
    to them. Measuring the compilation itself rather than first call minus a steady call keeps
    the slow workloads (W2: seconds per call) from paying two extra calls and from the noise of
    subtracting two long timings."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0

    def run():
        return jax.block_until_ready(compiled(*args))

    return Peer(run=run, compile_s=compile_s)


def _arr(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().cpu().float().numpy())


# ----------------------------------------------------------------------------- W1


def _w1_result(outs, grads, e, coupled: bool) -> jax.Array:
    """The expected GSC(l, 0) for every l from the layer outputs and ``dE/df_l``, as
    ``benchlib.autograd_gsc`` computes it (index l = L - i for model layer i)."""
    L = len(outs)
    res = [jnp.ones((), jnp.float32)] * (L + 1)
    if coupled:  # the whole batch is one datapoint
        e2 = jnp.square(e.sum())
        for i, (o, g) in enumerate(zip(outs, grads)):
            res[L - i] = jnp.sum(g * g) / o.size * jnp.sum(o * o) / e2
    else:
        e2 = jnp.mean(e * e)
        for i, (o, g) in enumerate(zip(outs, grads)):
            g2 = jnp.mean(jnp.sum(g * g, 1))
            res[L - i] = g2 / o.shape[1] * jnp.mean(jnp.sum(o * o, 1)) / e2
    return jnp.stack(res)


def w1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, how: str) -> Peer:
    """``gsc`` (GSC(l, 0) for every l, dot error) with ``how`` = ``"grad"`` or ``"vjp"``."""
    static, params = convert(model)
    coupled = gscfast.compile_model(model).couples_batch

    def by_grad(params, x, y):
        def err(deltas):
            h, outs = x, []
            for st, p, d in zip(static, params, deltas):
                h = _apply(st, p, h) + d
                outs.append(h)
            e = jnp.sum(h * y, 1)
            return e.sum(), (outs, e)

        zeros = [jnp.zeros((x.shape[0], p[0].shape[0]), x.dtype) for p in params]
        grads, (outs, e) = jax.grad(err, has_aux=True)(zeros)
        return _w1_result(outs, grads, e, coupled)

    def by_vjp(params, x, y):
        h, outs, pullbacks = x, [], []
        for st, p in zip(static, params):
            h, pb = jax.vjp(lambda hh, st=st, p=p: _apply(st, p, hh), h)
            outs.append(h)
            pullbacks.append(pb)
        e = jnp.sum(h * y, 1)
        grads = [y] * len(outs)  # dE/df_1 = y for E = sum of the dot errors
        for i in range(len(outs) - 1, 0, -1):
            (grads[i - 1],) = pullbacks[i](grads[i])
        return _w1_result(outs, grads, e, coupled)

    fns = {"grad": by_grad, "vjp": by_vjp}
    if how not in fns:
        raise ValueError(f"jaxpeers.w1: how must be one of {sorted(fns)}, got {how!r}")
    return _compile(fns[how], params, _arr(x), _arr(y))


# ----------------------------------------------------------------------------- W2


def w2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, how: str) -> Peer:
    """``gsc_matrix`` exact (dot error) with ``how`` = ``"fori"`` or ``"scan"``: per sample, the
    forward saving each layer's activation derivative, then from every start ``f_l`` the identity
    pushed through the later layers (``M <- M W``, then scaled by the next derivative), squared
    norms accumulated; ``vmap`` over samples. Plain MLPs with one hidden width (no norms)."""
    static, params = convert(model)
    L = len(static)
    if any(st.norm is not None for st in static):
        raise ValueError("jaxpeers.w2: layers with norms have no diagonal derivative chain")
    d = params[0][0].shape[0]
    if any(p[0].shape != (d, d) for p in params[1:]):
        raise ValueError(f"jaxpeers.w2: every layer after the first must be {d} x {d}")
    if how not in ("fori", "scan"):
        raise ValueError(f"jaxpeers.w2: how must be 'fori' or 'scan', got {how!r}")
    acts = [st.act for st in static]

    def per_sample(params, xi, yi):
        h, ders, fsq = xi, [], [None] * (L + 1)
        for i, ((w, b), act) in enumerate(zip(params, acts)):
            z = h @ w.T if b is None else h @ w.T + b
            h, der = jax.jvp(act, (z,), (jnp.ones_like(z),))  # elementwise: the derivative
            ders.append(der)
            fsq[L - i] = jnp.sum(h * h)
        e = jnp.sum(h * yi)
        fsq[0] = e * e
        # Ws[i - 1] is layer i's weight
        Ws = jnp.stack([p[0] for p in params[1:]]) if L > 1 else jnp.zeros((0, d, d), h.dtype)
        D = jnp.stack(ders)
        # sq[k, l] = ||d f_l / d f_k||^2 (k > l); column 0 is the error's gradient.
        sq = jnp.zeros((L + 1, L + 1), h.dtype)
        sq = sq.at[1, 0].set(jnp.sum(yi * yi))
        v0 = yi * D[L - 1]
        if how == "fori":

            def col0(j, c):  # i = L - 1 - j, down to 1
                v, sq = c
                i = L - 1 - j
                v = v @ Ws[i - 1]
                sq = sq.at[L - i + 1, 0].set(jnp.sum(v * v))
                return v * D[i - 1], sq

            _, sq = lax.fori_loop(0, L - 1, col0, (v0, sq))

            def column(l, sq):
                i0 = L - l

                def step(j, c):  # i = i0 - j, down to 1
                    M, sq = c
                    i = i0 - j
                    M = M @ Ws[i - 1]
                    sq = sq.at[L - i + 1, l].set(jnp.sum(M * M))
                    return M * D[i - 1][None, :], sq

                _, sq = lax.fori_loop(0, i0, step, (jnp.diag(D[i0]), sq))
                return sq

            sq = lax.fori_loop(1, L + 1, column, sq)
        else:

            def step(M, wd):
                w, der = wd
                M = M @ w
                return M * der, jnp.sum(M * M)

            if L > 1:  # layers L-1 .. 1 with the derivative of the layer below each
                _, norms = lax.scan(step, v0, (Ws[::-1], D[L - 2 :: -1]))
                sq = sq.at[2:, 0].set(norms)
            for l in range(1, L):  # start f_l is model layer i0 = L - l; l = L has no chain
                i0 = L - l
                _, norms = lax.scan(step, jnp.diag(D[i0]), (Ws[i0 - 1 :: -1], D[i0 - 1 :: -1]))
                sq = sq.at[l + 1 :, l].set(norms)
        return sq, jnp.stack(fsq)

    def fn(params, x, y):
        sq, fsq = jax.vmap(per_sample, in_axes=(None, 0, 0))(params, x, y)
        sq, fsq = sq.mean(0), fsq.mean(0)
        n = jnp.asarray([1.0] + [float(d)] * L, sq.dtype)
        res = sq / n[:, None] * fsq[:, None] / fsq[None, :]
        eye = jnp.eye(L + 1, dtype=bool)
        upper = jnp.triu(jnp.ones((L + 1, L + 1), dtype=bool), 1)
        return jnp.where(eye, 1.0, jnp.where(upper, jnp.nan, res))

    return _compile(fn, params, _arr(x), _arr(y))


# ----------------------------------------------------------------------------- W3


def w3(model: nn.Module, x: torch.Tensor, how: str) -> Peer:
    """Input-to-output ``jacobian`` per sample, ``[B, d_out, d_in]``, with ``how`` =
    ``"jacfwd"`` or ``"jacrev"`` under ``vmap`` (per-sample layers: no batch norm)."""
    static, params = convert(model)
    if any(st.norm == "batch" for st in static):
        raise ValueError("jaxpeers.w3: train-mode batch norm couples the batch: no per-sample vmap")
    jac = {"jacfwd": jax.jacfwd, "jacrev": jax.jacrev}
    if how not in jac:
        raise ValueError(f"jaxpeers.w3: how must be one of {sorted(jac)}, got {how!r}")

    def f(params, xi):
        h = xi
        for st, p in zip(static, params):
            h = _apply(st, p, h)
        return h

    def fn(params, x):
        return jax.vmap(jac[how](f, argnums=1), in_axes=(None, 0))(params, x)

    return _compile(fn, params, _arr(x))
