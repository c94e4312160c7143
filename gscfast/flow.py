"""``GradientFlow``: record per-weight gradient statistics (and the GSC) during training.

Works with any ``nn.Module`` (convolutions included): gradients are read by hooks that run when a
parameter's gradient has been accumulated, so nothing about the model or the training loop changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NumericalError
from .io import atomic_write, save_figure
from .validation import BATCHNORM_MODES

__all__ = ["GradientFlow", "plot_flow", "tensorboard_writer", "wandb_writer"]


class GradientFlow:
    """Record each weight's mean absolute gradient and gradient norm every ``every`` steps.

    Use as a context manager around training; call ``step()`` once per optimizer step (after
    ``backward``). Hooks are removed on exit and the model is left unchanged.

    Args:
        model: any module.
        every: record steps ``0, every, 2 * every, ...``.
        steps: further steps to record (e.g. the last step of a training run).
        start: the index of the first step (a run resumed from a checkpoint continues counting).
        gsc_data: optional ``(x, y)``; on recorded steps the GSC ``GSC(l, 0)`` of the model is
            computed on them with ``error`` when the whole model compiles with analytic rules
            (no module taken by the generic rule: an ``nn.Sequential`` CNN does); otherwise that
            of its longest such tail of top-level children (e.g. the classifier after a custom
            module), fed by a copy of the rest run on ``x`` (the model's own running
            statistics are never touched). None where nothing compiles, or where the top module
            itself has a hook or an overridden forward (its children's tail is not its function).
            Where values are not finite (a diverging run), the record has ``"gsc": None`` and
            the reason in ``"gsc_error"`` (``measure_gsc``).
        gsc_layers: module names (``model.named_modules()``) whose outputs are the layer
            boundaries, in forward order: the GSC is then that of the whole model, whatever it
            is (a CNN's blocks, say), by ``gscfast.gsc(..., layers=gsc_layers)``.
        error: the error layer for the GSC (``"kl"`` with class labels, or ``"dot"``).
        batchnorm: how a train-mode batch norm is measured: ``"frozen"`` (default: one datapoint
            per row of ``x``, the batch statistics of ``x`` held constant) or ``"batch"`` (the
            whole of ``x`` is one datapoint). With a positive error (``"kl"``) summed over one
            batch datapoint, ``GSC(l, 0)`` shrinks like ``1 / len(x)`` (definitions.md), so the
            frozen form is the one comparable across data sizes and architectures.
        writers: callables ``writer(step, record)``; see ``tensorboard_writer``/``wandb_writer``.
        include: which parameters to record (default: those with ``dim() >= 2``, the weights).

    Example:
        >>> with GradientFlow(model, every=10) as flow:
        ...     for x, y in loader:
        ...         loss_fn(model(x), y).backward(); opt.step(); flow.step(); opt.zero_grad()
        >>> flow.plot("flow.png"); flow.to_json("flow.json")
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        *,
        steps: Collection[int] = (),
        start: int = 0,
        gsc_data: tuple[Tensor, Tensor] | None = None,
        gsc_layers: Sequence[str] | None = None,
        error: str = "kl",
        batchnorm: str = "frozen",
        writers: list[Callable[[int, dict[str, Any]], None]] | None = None,
        include: Callable[[str, nn.Parameter], bool] | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        self.model = model
        self.every = every
        self.steps = frozenset(int(s) for s in steps)
        self.gsc_data = gsc_data
        if gsc_layers is not None:
            from .boundaries import check_names

            check_names(model, gsc_layers)
        self.gsc_layers = None if gsc_layers is None else list(gsc_layers)
        self.error = error
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        self.batchnorm = batchnorm
        self.writers = list(writers or [])
        self.include = include or (lambda name, p: p.dim() >= 2)
        self.records: dict[int, dict[str, Any]] = {}
        self.step_index = start
        self._names: list[str] = []  # recorded parameters in the model's order (input to output)
        self._handles: list[Any] = []
        self._current: dict[str, dict[str, float]] = {}
        self._tail: nn.Module | None = None
        self._head: nn.Module | None = None

    # -- hooks -------------------------------------------------------------------------------
    def __enter__(self) -> GradientFlow:
        for name, p in self.model.named_parameters():
            if p.requires_grad and self.include(name, p):
                self._names.append(name)
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))
        if self.gsc_data is not None and self.gsc_layers is None:
            self._head, self._tail = self._split()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._names.clear()

    def recording(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the current one) is recorded."""
        step = self.step_index if step is None else step
        return step % self.every == 0 or step in self.steps

    def _grad_hook(self, name: str):
        def hook(p: Tensor) -> None:
            if p.grad is not None and self.recording():
                g = p.grad.detach()
                self._current[name] = {"mean_abs": float(g.abs().mean()), "norm": float(g.norm())}

        return hook

    def _split(self) -> tuple[nn.Module | None, nn.Module | None]:
        """(head, tail): the tail is the longest compilable suffix of top-level children."""
        from .compiler import check_plain, compile_model

        try:  # a hook or an overridden forward on the container changes what its children compose
            check_plain(self.model, "model")
        except TypeError:
            return None, None
        children = list(self.model) if isinstance(self.model, nn.Sequential) else [self.model]
        for i in range(len(children)):
            tail = self.model if i == 0 else nn.Sequential(*children[i:])
            try:
                if compile_model(tail).generic:  # analytic rules only (as documented): the
                    continue  # generic rule's checks call modules, with side effects
            except TypeError:
                continue
            return (nn.Sequential(*children[:i]) if i else None), tail
        return None, None

    # -- recording ---------------------------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Close the current step: store (and write) its record if it is a recorded step."""
        record: dict[str, Any] | None = None
        if self._current and self.recording():
            # Hooks fire in backward order (output first); store in the model's order instead.
            record = {"weights": {n: self._current[n] for n in self._names if n in self._current}}
            record.update(self.measure_gsc())
            self.records[self.step_index] = record
            for write in self.writers:
                write(self.step_index, record)
        self._current = {}
        self.step_index += 1
        return record

    __call__ = step

    def measure_gsc(self) -> dict[str, Any]:
        """The GSC entries of a record, measured on the model as it is now: ``{"gsc": [GSC(l, 0)
        for l = 0..L]}``; ``{}`` without ``gsc_data`` or where nothing compiles (see the class);
        ``{"gsc": None, "gsc_error": why}`` where values are not finite (a diverging run: its
        parameters, or an overflow inside), refused as everywhere in gscfast but without
        stopping the training being watched. Any other refusal (a boundary that does not cut
        the graph, say) raises."""
        try:
            gsc = self._gsc()
        except NumericalError as e:
            return {"gsc": None, "gsc_error": str(e)}
        return {} if gsc is None else {"gsc": gsc}

    def _gsc(self) -> list[float] | None:
        # float64 values from the moments: a float32 model's GSC can lie below float32's range
        from .api import gsc_moments

        if self.gsc_data is not None and self.gsc_layers is not None:  # the whole model
            x, y = self.gsc_data
            moments = gsc_moments(
                self.model, x, y, error=self.error, batchnorm=self.batchnorm, layers=self.gsc_layers
            )
            return moments.gsc().tolist()
        if self._tail is None:
            return None
        import copy

        assert self.gsc_data is not None  # the model is split (_tail) only when it is given
        x, y = self.gsc_data
        if self._head is not None:
            with torch.no_grad():
                x = copy.deepcopy(self._head)(x)  # what the tail receives in the model
        moments = gsc_moments(self._tail, x, y, error=self.error, batchnorm=self.batchnorm)
        return moments.gsc().tolist()

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"every": self.every, "records": {str(k): v for k, v in self.records.items()}}

    def to_json(self, path: str | os.PathLike) -> None:
        """Write all records atomically."""
        atomic_write(path, json.dumps(self.to_dict(), indent=1))

    def plot(
        self,
        path: str | os.PathLike | None = None,
        *,
        step: int | None = None,
        steps: Sequence[int] | None = None,
    ):
        """The classic gradient-flow bar plot: mean |grad| (and norm) per weight, input to output,
        for ``step`` (default: the last recorded step), or one panel per step of ``steps``.
        Written atomically to ``path`` if given (format from its suffix). Returns the figure."""
        if not self.records:
            raise ValueError("nothing recorded yet: call step() after backward()")
        if steps is None:
            steps = [max(self.records) if step is None else step]
        fig = plot_flow(self.records, steps)
        if path is not None:
            save_figure(fig, [Path(path)])
        return fig


def plot_flow(
    records: Mapping[int, dict[str, Any]] | Mapping[str, dict[str, Any]],
    steps: Sequence[int],
    *,
    titles: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    suptitle: str | None = None,
):
    """The classic gradient-flow bar plot from ``GradientFlow`` records (as ``records`` or as
    read back from ``to_json``, string keys): per weight, input to output, a light bar for the
    gradient norm and a dark one for the mean absolute gradient, log scale; one panel per step of
    ``steps`` (sharing both axes, so the steps compare at a glance). ``titles``: one per step
    (default ``"step N"``); ``labels``: shorter tick labels for parameter names. Returns the
    figure (on matplotlib's current backend; the caller saves and closes it)."""
    import matplotlib.pyplot as plt

    recs = {int(k): v for k, v in records.items()}
    missing = [s for s in steps if s not in recs]
    if not steps or missing:
        raise ValueError(f"no record for steps {missing}; recorded: {sorted(recs)[:10]}...")
    names = list(recs[steps[0]]["weights"])
    fig, axes = plt.subplots(
        len(steps),
        1,
        figsize=(max(6, 0.3 * len(names) + 2), 2.2 + 2.3 * len(steps)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    pos = list(range(len(names)))
    for i, (ax, step) in enumerate(zip(axes[:, 0], steps)):
        w = recs[step]["weights"]

        def values(
            key: str, w: dict = w
        ) -> list[float]:  # missing or null (non-finite, from JSON): no bar
            return [float("nan") if w.get(n, {}).get(key) is None else w[n][key] for n in names]

        ax.bar(pos, values("norm"), alpha=0.35, color="c", label="gradient norm")
        ax.bar(pos, values("mean_abs"), alpha=0.85, color="b", label="mean |gradient|")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(titles[i] if titles else f"step {step}", fontsize=10)
        if i == 0:
            ax.legend(fontsize=8)
    ax = axes[-1, 0]
    ax.set_xticks(pos, [(labels or {}).get(n, n) for n in names], rotation=90, fontsize=7)
    ax.set_xlabel("weights (input to output)")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def tensorboard_writer(summary_writer) -> Callable[[int, dict[str, Any]], None]:
    """A writer for ``GradientFlow(writers=[...])`` that logs through a
    ``torch.utils.tensorboard.SummaryWriter`` (``add_scalar``), in double precision: as float32
    (``add_scalar``'s default) a float64 network's vanishing GSC or gradient (below 1e-45) would
    show as 0 and an exploding one (above 3.4e38) as inf."""

    def add(tag: str, value: float, step: int) -> None:
        summary_writer.add_scalar(tag, value, step, new_style=True, double_precision=True)

    def write(step: int, record: dict[str, Any]) -> None:
        for name, s in record["weights"].items():
            add(f"grad_mean_abs/{name}", s["mean_abs"], step)
            add(f"grad_norm/{name}", s["norm"], step)
        for l, v in enumerate(record.get("gsc") or []):  # None: not finite (gsc_error)
            add(f"gsc/{l}", v, step)

    return write


def wandb_writer(run=None) -> Callable[[int, dict[str, Any]], None]:
    """A writer that calls ``wandb.log`` (or ``run.log``) with flattened scalars at the flow's step.

    W&B ignores data logged at a step below its run's current step, with only a console warning.
    That happens when the training loop's own ``wandb.log`` calls without ``step=`` run ahead of
    the flow, e.g. logging the loss before ``flow.step()`` rather than after it. Such a record is
    refused with a ValueError instead (it stays in ``flow.records``). In ``mode="shared"`` runs
    W&B ignores ``step=`` and logs at its own step (and has no ``run.step``): nothing to check.
    """

    def write(step: int, record: dict[str, Any]) -> None:
        import wandb

        target = run if run is not None else wandb.run  # None: wandb.log says to call wandb.init
        current = 0 if target is None or target.settings.mode == "shared" else target.step
        if step < current:
            raise ValueError(
                f"W&B's run is at step {current}, past GradientFlow's step {step}: W&B would "
                "ignore this record. Log your own metrics after flow.step() or with "
                "step=flow.step_index, and start GradientFlow at the run's step (start=run.step)"
            )
        flat = {f"grad_mean_abs/{n}": s["mean_abs"] for n, s in record["weights"].items()}
        flat |= {f"grad_norm/{n}": s["norm"] for n, s in record["weights"].items()}
        flat |= {f"gsc/{l}": v for l, v in enumerate(record.get("gsc") or [])}
        (run.log if run is not None else wandb.log)(flat, step=step)

    return write
