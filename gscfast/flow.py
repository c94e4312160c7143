"""``GradientFlow``: record per-weight gradient statistics (and the GSC) during training.

Works with any ``nn.Module`` (convolutions included): gradients are read by hooks that run when a
parameter's gradient has been accumulated, so nothing about the model or the training loop changes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["GradientFlow"]


class GradientFlow:
    """Record each weight's mean absolute gradient and gradient norm every ``every`` steps.

    Use as a context manager around training; call ``step()`` once per optimizer step (after
    ``backward``). Hooks are removed on exit and the model is left unchanged.

    Args:
        model: any module.
        every: record steps ``0, every, 2 * every, ...``.
        gsc_data: optional ``(x, y)``; on recorded steps the GSC ``GSC(l, 0)`` of the model is
            computed on them with ``error`` when the whole model compiles; otherwise that of its
            longest compilable tail of top-level children (e.g. the MLP classifier of a
            convolutional net), fed by a copy of the rest run on ``x`` (the model's own running
            statistics are never touched).
        error: the error layer for the GSC (``"kl"`` with class labels, or ``"dot"``).
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
        gsc_data: tuple[Tensor, Tensor] | None = None,
        error: str = "kl",
        writers: list[Callable[[int, dict[str, Any]], None]] | None = None,
        include: Callable[[str, nn.Parameter], bool] | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.model = model
        self.every = every
        self.gsc_data = gsc_data
        self.error = error
        self.writers = list(writers or [])
        self.include = include or (lambda name, p: p.dim() >= 2)
        self.records: dict[int, dict[str, Any]] = {}
        self.step_index = 0
        self._handles: list[Any] = []
        self._current: dict[str, dict[str, float]] = {}
        self._tail: nn.Module | None = None
        self._head: nn.Module | None = None

    # -- hooks -------------------------------------------------------------------------------
    def __enter__(self) -> "GradientFlow":
        for name, p in self.model.named_parameters():
            if p.requires_grad and self.include(name, p):
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))
        if self.gsc_data is not None:
            self._head, self._tail = self._split()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _grad_hook(self, name: str):
        def hook(p: Tensor) -> None:
            if self.step_index % self.every == 0 and p.grad is not None:
                g = p.grad.detach()
                self._current[name] = {"mean_abs": float(g.abs().mean()), "norm": float(g.norm())}
        return hook

    def _split(self) -> tuple[nn.Module | None, nn.Module | None]:
        """(head, tail): the tail is the longest compilable suffix of top-level children."""
        from .compiler import compile_model

        children = list(self.model) if isinstance(self.model, nn.Sequential) else [self.model]
        for i in range(len(children)):
            tail = self.model if i == 0 else nn.Sequential(*children[i:])
            try:
                compile_model(tail)
            except TypeError:
                continue
            return (nn.Sequential(*children[:i]) if i else None), tail
        return None, None

    # -- recording ---------------------------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Close the current step: store (and write) its record if it is a recorded step."""
        record = None
        if self.step_index % self.every == 0 and self._current:
            record = {"weights": dict(self._current)}
            gsc = self._gsc()
            if gsc is not None:
                record["gsc"] = gsc
            self.records[self.step_index] = record
            for write in self.writers:
                write(self.step_index, record)
        self._current = {}
        self.step_index += 1
        return record

    __call__ = step

    def _gsc(self) -> list[float] | None:
        if self._tail is None:
            return None
        from .api import gsc

        import copy

        x, y = self.gsc_data
        if self._head is not None:
            with torch.no_grad():
                x = copy.deepcopy(self._head)(x).flatten(1)
        return gsc(self._tail, x, y, error=self.error).tolist()

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"every": self.every, "records": {str(k): v for k, v in self.records.items()}}

    def to_json(self, path: str | os.PathLike) -> None:
        """Write all records atomically."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    def plot(self, path: str | os.PathLike | None = None, *, step: int | None = None):
        """The classic gradient-flow bar plot: mean |grad| (and norm) per weight, input to output,
        for ``step`` (default: the last recorded step). Returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if not self.records:
            raise ValueError("nothing recorded yet: call step() after backward()")
        step = max(self.records) if step is None else step
        weights = self.records[step]["weights"]
        names = list(weights)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
        pos = range(len(names))
        ax.bar(pos, [weights[n]["norm"] for n in names], alpha=0.4, color="c", label="gradient norm")
        ax.bar(pos, [weights[n]["mean_abs"] for n in names], alpha=0.8, color="b", label="mean |gradient|")
        ax.set_xticks(list(pos), names, rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("weights (input to output)")
        ax.set_title(f"gradient flow at step {step}")
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def tensorboard_writer(summary_writer) -> Callable[[int, dict[str, Any]], None]:
    """A writer for ``GradientFlow(writers=[...])`` that logs through a
    ``torch.utils.tensorboard.SummaryWriter`` (``add_scalar``)."""
    def write(step: int, record: dict[str, Any]) -> None:
        for name, s in record["weights"].items():
            summary_writer.add_scalar(f"grad_mean_abs/{name}", s["mean_abs"], step)
            summary_writer.add_scalar(f"grad_norm/{name}", s["norm"], step)
        for l, v in enumerate(record.get("gsc", [])):
            summary_writer.add_scalar(f"gsc/{l}", v, step)
    return write


def wandb_writer(run=None) -> Callable[[int, dict[str, Any]], None]:
    """A writer that calls ``wandb.log`` (or ``run.log``) with flattened scalars."""
    def write(step: int, record: dict[str, Any]) -> None:
        log = run.log if run is not None else __import__("wandb").log
        flat = {f"grad_mean_abs/{n}": s["mean_abs"] for n, s in record["weights"].items()}
        flat |= {f"grad_norm/{n}": s["norm"] for n, s in record["weights"].items()}
        flat |= {f"gsc/{l}": v for l, v in enumerate(record.get("gsc", []))}
        log(flat, step=step)
    return write
