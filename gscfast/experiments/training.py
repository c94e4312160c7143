"""What the training studies share (``cifar``, ``vgg``): the resumable epoch loop (``EpochLoop``),
per-epoch checkpoints written atomically and loaded safely, the global RNG state, seeded minibatch
orders, deterministic cuDNN and progress lines.

A training job of these studies runs for hours inside one runner job, so it checkpoints after every
epoch and, on ``--resume``, continues from the last checkpoint. Resumed training gives the same
numbers as uninterrupted training because everything random is drawn from generators seeded per
epoch (``minibatches``) and everything stateful (model, optimizer, schedule, RNG) is checkpointed.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .outputs import json_safe
from .runner import ResultsDirError, atomic_write

__all__ = [
    "CheckpointError",
    "EpochLoop",
    "deterministic",
    "load_checkpoint",
    "minibatches",
    "progress_line",
    "restore_training_state",
    "rng_state",
    "save_checkpoint",
    "save_training_state",
    "set_rng_state",
]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically (a kill mid-write leaves the old checkpoint).
    Keep ``state`` to tensors and plain values so that ``load_checkpoint`` can load it safely."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


class CheckpointError(ResultsDirError):
    """A checkpoint file that cannot be loaded (truncated, not a checkpoint, or asking to run code)
    or that does not hold a training state; the message names the file and what to do."""


def _unloadable(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} cannot be used: {reason}. Delete it to restart that job from its first "
        f"epoch (finished jobs are kept), then run the same command with --resume"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded safely (``weights_only=True``: no code runs).

    Raises:
        CheckpointError: the file cannot be read, is truncated or no checkpoint, or refers to code
            (a checkpoint of ``save_checkpoint`` never does; such a file may be malicious).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, i.e. running the file's code: never say that.
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = (
            f"a reference to code ({found.group(1)})"
            if found
            else "objects other than tensors and plain values"
        )
        raise _unloadable(
            path,
            f"it holds {what}, which a gscfast checkpoint never does (the file "
            f"is damaged or was not written by gscfast; do not load it by other "
            f"means)",
        ) from None
    except OSError as e:
        raise _unloadable(path, f"it cannot be read ({e.strerror or e})") from None
    except Exception as e:  # torch.load raises many types on a damaged file
        detail = str(e).split(". ")[0].strip() if isinstance(e, RuntimeError) else type(e).__name__
        raise _unloadable(path, f"it is truncated or not a PyTorch checkpoint ({detail})") from None
    if not isinstance(state, dict):
        raise _unloadable(path, f"it holds a {type(state).__name__}, not a training state")
    return state


def save_training_state(path: str | Path, stateful: Mapping[str, Any], **extra: Any) -> None:
    """Checkpoint each object of ``stateful`` (model, optimizer, schedule, ...: anything with
    ``state_dict``) under its name, the global RNG state as ``"rng"``, and the plain values
    ``extra`` (e.g. the history as a JSON string)."""
    save_checkpoint(
        path, {**{k: v.state_dict() for k, v in stateful.items()}, "rng": rng_state(), **extra}
    )


def restore_training_state(
    path: str | Path | None, stateful: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The inverse of ``save_training_state``: if ``path`` is a file, load it, restore each object
    of ``stateful`` and the RNG state, and return the checkpoint (for its extra values); else None."""
    if path is None or not Path(path).is_file():
        return None
    c = load_checkpoint(path)
    try:
        for k, v in stateful.items():
            v.load_state_dict(c[k])
        set_rng_state(c["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        # A loadable file of another job, architecture or gscfast version.
        what = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e).split("\n")[0][:200]
        raise _unloadable(
            Path(path), f"it does not hold this job's training state ({what})"
        ) from None
    return c


def rng_state() -> dict[str, Any]:
    """The global CPU RNG state and, when CUDA is initialized, every GPU's."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | Tensor) -> None:
    """Restore what ``rng_state`` returned (a bare tensor: the CPU state of older checkpoints)."""
    if isinstance(state, Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def minibatches(
    n: int, batch_size: int, seed: int, device: torch.device | str = "cpu"
) -> Iterator[Tensor]:
    """Index tensors of one epoch's minibatches: a permutation of ``range(n)`` drawn from a
    generator seeded with ``seed`` (so the order does not depend on anything that ran before),
    cut into batches of ``min(batch_size, n)``, the last incomplete batch dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).to(device)
    bs = min(batch_size, n)
    for i in range(0, n - bs + 1, bs):
        yield perm[i : i + bs]


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """On CUDA, deterministic cuDNN kernels without autotuning (otherwise convolutions may pick
    other algorithms or use atomics, and a resumed run would not repeat an uninterrupted one);
    restored afterwards. Nothing to do on the CPU."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    old = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = old


def progress_line(text: str) -> None:
    """One progress line on stderr that does not break the runner's progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(text, file=sys.stderr, flush=True)
        return
    tqdm.write(text, file=sys.stderr)


class EpochLoop:
    """The resumable epoch loop of a training job: restore the last checkpoint, run the epochs
    still to do, checkpoint after each one atomically, show progress.

    Constructing it restores ``checkpoint`` if the file exists (``restore_training_state``:
    ``stateful`` and the RNG state, refused with ``CheckpointError`` if it is no checkpoint of this
    job), together with ``epoch``, ``diverged`` and the JSON-able ``values`` (the job's history,
    ...; ``values`` holds the initial ones, replaced in place by the checkpoint's). ``run(train)``
    then calls ``train(e)`` for each epoch ``e`` still to do, until ``epochs`` or divergence;
    ``train`` updates ``values`` and returns ``(diverged, text)``, ``text`` its progress report.
    Values are checkpointed as strict JSON (``json_safe``: non-finite numbers become null).

    Args:
        checkpoint: the job's checkpoint file, or None (no checkpoints).
        stateful: name -> object with ``state_dict`` (model, optimizer, schedule, ...).
        epochs: the epochs of the whole job.
        values: name -> JSON-able value, checkpointed with the training state.
        desc: the job's name in progress reports.
        progress: ``"bar"`` (an epoch bar, the last text as its postfix: for short epochs),
            ``"lines"`` (one line per epoch, ``"<desc> epoch e/epochs: <text>"``: for long ones) or
            None.
        interrupt_after: test hook: raise ``KeyboardInterrupt`` after this many epochs computed
            by this ``run`` while epochs remain (a kill right after a checkpoint).
    """

    def __init__(
        self,
        checkpoint: str | Path | None,
        stateful: Mapping[str, Any],
        epochs: int,
        values: dict[str, Any],
        *,
        desc: str,
        progress: str | None = None,
        interrupt_after: int | None = None,
    ) -> None:
        if progress not in (None, "bar", "lines"):
            raise ValueError(f"progress must be None, 'bar' or 'lines', got {progress!r}")
        clash = sorted(set(values) & {*stateful, "rng", "epoch", "state"})
        if clash:
            raise ValueError(f"values {clash} would overwrite the checkpoint's own entries")
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.stateful = stateful
        self.epochs = epochs
        self.values = values
        self.desc = desc
        self.progress = progress
        self.interrupt_after = interrupt_after
        self.epoch = 0
        self.diverged = False
        c = restore_training_state(self.checkpoint, stateful)
        if c is not None:
            assert self.checkpoint is not None  # restore_training_state found the file
            try:
                state = json.loads(c["state"])
                self.epoch, self.diverged = int(state["epoch"]), bool(state["diverged"])
                values.update({k: json.loads(c[k]) for k in values})
            except (KeyError, ValueError, TypeError) as e:
                what = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)[:200]
                raise _unloadable(
                    self.checkpoint, f"it does not hold this job's training state ({what})"
                ) from None

    def run(self, train: Callable[[int], tuple[bool, str]]) -> None:
        """Train the epochs still to do (class docstring)."""
        bar = None
        if self.progress == "bar":
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.epochs,
                initial=self.epoch,
                desc=self.desc,
                unit="epoch",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        done_here = 0
        try:
            while self.epoch < self.epochs and not self.diverged:
                e = self.epoch + 1
                diverged, text = train(e)
                self.epoch, self.diverged = e, diverged
                if self.checkpoint is not None:
                    save_training_state(
                        self.checkpoint,
                        self.stateful,
                        epoch=e,
                        state=json.dumps({"epoch": e, "diverged": diverged}),
                        **{k: json.dumps(json_safe(v)) for k, v in self.values.items()},
                    )
                if bar is not None:
                    bar.set_postfix_str(text, refresh=False)
                    bar.update(1)
                elif self.progress == "lines":
                    progress_line(f"{self.desc} epoch {e}/{self.epochs}: {text}")
                done_here += 1
                if (
                    self.interrupt_after is not None
                    and done_here >= self.interrupt_after
                    and e < self.epochs
                ):
                    raise KeyboardInterrupt(f"test hook: stopped after {done_here} epochs")
        finally:
            if bar is not None:
                bar.close()
