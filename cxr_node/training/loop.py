"""The epoch loop shared by every network: seeded order, early stopping, per-epoch checkpoints and resume.

What differs between the U-Net and a classifier (how a batch is built, the loss, the validation score) is a
:class:`Task`; :func:`fit` does the rest. Every random draw of an epoch comes from seeds derived from
``(seed, epoch)``: the data order, the augmentation, and torch's global generator (dropout). So a run that
stops after epoch *k* and resumes from its checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from cxr_node.errors import ModelError
from cxr_node.infer.device import place
from cxr_node.infer.registry import StateDict

_ORDER, _AUGMENT, _GLOBAL = 0, 1, 2


@dataclass(frozen=True)
class FitOptions:
    """How to train.

    Attributes
    ----------
    epochs : int
        Most epochs to run.
    batch_size : int
        Images per optimisation step (a last batch of one is dropped: batch norm needs two).
    lr, weight_decay : float
        Adam(W) peak learning rate and decoupled weight decay.
    schedule : {"cosine", "constant"}
        ``cosine``: the learning rate of epoch *e* (1-based) of *E* is ``lr * (1 + cos(pi (e - 1) / E)) / 2``,
        a function of the epoch alone, so a resumed run follows the same schedule.
    patience : int
        Stop after this many epochs without a better validation score.
    seed : int
        Seed of everything random.
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``; on CUDA the forward pass runs under bfloat16 autocast.
    checkpoint : pathlib.Path or None
        Where to save the state after every epoch.
    resume : bool
        Continue from ``checkpoint`` when it exists.
    progress : bool
        Show a progress line (tqdm when installed) on a terminal.
    channels_last : bool
        Train in NHWC memory format (about twice as fast for these networks on a CPU); the weights
        written are the same either way.
    """

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int = 5
    seed: int = 0
    device: str = "cpu"
    checkpoint: Path | None = None
    resume: bool = False
    progress: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 1 or not self.lr > 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 2, patience >= 1, lr > 0; found {self.epochs}, "
                f"{self.batch_size}, {self.patience}, {self.lr}"
            )


@dataclass(frozen=True)
class EpochLog:
    """One epoch's summary (the per-epoch log line)."""

    name: str
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_score: float
    score_name: str
    seconds: float
    best: bool

    def line(self) -> str:
        """Return the log line, e.g. ``unet epoch 3/20  train loss 0.2100  val loss 0.1800  dice 0.9412 *``."""
        star = " *" if self.best else ""
        return (
            f"{self.name} epoch {self.epoch}/{self.epochs}  train loss {self.train_loss:.4f}  "
            f"val loss {self.val_loss:.4f}  {self.score_name} {self.val_score:.4f}  {self.seconds:.1f}s{star}"
        )


@dataclass
class FitResult:
    """What :func:`fit` returns: the best weights by validation, and the history."""

    best_state: StateDict
    best_score: float
    best_epoch: int
    last_state: StateDict
    history: list[EpochLog] = field(default_factory=list)


class Task(Protocol):
    """What a network's training needs beyond the loop."""

    name: str
    score_name: str
    n_train: int

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (inputs, targets) of the training images ``indices``, augmented with ``generator``."""
        ...

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar training loss."""
        ...

    def validate(self, model: nn.Module, device: torch.device) -> tuple[float, float]:
        """Return (score, loss) on the validation set; a higher score is better."""
        ...


def derive_seed(seed: int, epoch: int, stream: int) -> int:
    """Return a well-mixed 63-bit seed for one stream of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> 1)


@contextmanager
def deterministic() -> Iterator[None]:
    """Use deterministic algorithms (warning where torch has none) for the duration, then restore."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def fit(
    model: nn.Module, task: Task, options: FitOptions, on_epoch: Callable[[EpochLog], None] | None = None
) -> FitResult:
    """Train ``model`` on ``task`` with Adam(W), early stopping on the validation score; return the best weights.

    Parameters
    ----------
    model : torch.nn.Module
        Initialised (seeded by the caller); trained in place.
    task : Task
        Batches, loss and validation.
    options : FitOptions
        Epochs, batch size, learning rate, patience, seed, device, checkpoint and resume.
    on_epoch : callable, optional
        Called with each epoch's :class:`EpochLog` (the per-epoch log line).

    Returns
    -------
    FitResult
        The best and last weights (on the CPU) and each epoch's log.
    """
    device = torch.device(options.device)
    place(model, device, _memory_format(options))
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    state = _State(best_state=_cpu_state(model))
    if options.resume and options.checkpoint is not None and options.checkpoint.is_file():
        state = _restore(options.checkpoint, model, optimiser)
    with deterministic():
        for epoch in range(state.epoch + 1, options.epochs + 1):
            if state.bad_epochs >= options.patience:
                break
            log = _epoch(model, task, optimiser, options, epoch, state, device)
            if on_epoch is not None:
                on_epoch(log)
            if options.checkpoint is not None:
                _save(options.checkpoint, model, optimiser, state)
    return FitResult(state.best_state, state.best_score, state.best_epoch, _cpu_state(model), state.history)


@dataclass
class _State:
    """The loop's progress, all of it in the checkpoint."""

    epoch: int = 0
    best_score: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: StateDict = field(default_factory=dict)
    history: list[EpochLog] = field(default_factory=list)


def _epoch(
    model: nn.Module,
    task: Task,
    optimiser: torch.optim.Optimizer,
    options: FitOptions,
    epoch: int,
    state: _State,
    device: torch.device,
) -> EpochLog:
    """Run one training epoch and its validation; update ``state``; return the epoch's log."""
    clock = time.perf_counter()
    torch.manual_seed(derive_seed(options.seed, epoch, _GLOBAL))
    for group in optimiser.param_groups:
        group["lr"] = epoch_lr(options, epoch)
    train_loss = _train_epoch(model, task, optimiser, options, epoch, device)
    model.eval()
    with torch.no_grad(), _autocast(device):
        score, val_loss = task.validate(model, device)
    score = score if math.isfinite(score) else -math.inf
    better = (score, -val_loss) > (state.best_score, -state.best_loss)
    if better:
        state.best_score, state.best_loss, state.best_epoch = score, val_loss, epoch
        state.best_state, state.bad_epochs = _cpu_state(model), 0
    else:
        state.bad_epochs += 1
    state.epoch = epoch
    log = EpochLog(task.name, epoch, options.epochs, train_loss, val_loss, score, task.score_name,
                   time.perf_counter() - clock, better)  # fmt: skip
    state.history.append(log)
    return log


def _train_epoch(
    model: nn.Module,
    task: Task,
    optimiser: torch.optim.Optimizer,
    options: FitOptions,
    epoch: int,
    device: torch.device,
) -> float:
    """Run one pass over the training images in a seeded order; return the mean loss."""
    model.train()
    order = torch.randperm(
        task.n_train, generator=torch.Generator().manual_seed(derive_seed(options.seed, epoch, _ORDER))
    )
    augmenter = torch.Generator().manual_seed(derive_seed(options.seed, epoch, _AUGMENT))
    batches = [order[i : i + options.batch_size] for i in range(0, task.n_train, options.batch_size)]
    batches = [b for b in batches if b.numel() > 1]
    total, seen = 0.0, 0
    with _progress(f"{task.name} {epoch}/{options.epochs}", len(batches), options.progress) as tick:
        for indices in batches:
            inputs, targets = task.batch(indices, augmenter)
            with _autocast(device):
                x = inputs.to(device).contiguous(memory_format=_memory_format(options))
                loss = task.loss(model(x), targets.to(device))
            optimiser.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimiser.step()
            total, seen = total + float(loss.detach()) * indices.numel(), seen + indices.numel()
            tick(float(loss.detach()))
    return total / max(seen, 1)


def epoch_lr(options: FitOptions, epoch: int) -> float:
    """Return the learning rate of ``epoch`` (1-based) under the options' schedule."""
    if options.schedule == "constant":
        return options.lr
    return options.lr * (1 + math.cos(math.pi * (epoch - 1) / options.epochs)) / 2


def _memory_format(options: FitOptions) -> torch.memory_format:
    """Return the memory format the options ask for."""
    return torch.channels_last if options.channels_last else torch.contiguous_format


def _autocast(device: torch.device) -> Any:
    """Return bfloat16 autocast on CUDA (mixed precision), a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _cpu_state(model: nn.Module) -> StateDict:
    """Return a detached float32 CPU copy of ``model``'s state dict."""
    return {
        key: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().contiguous().clone()
        for key, value in model.state_dict().items()
    }


# -------------------------------------------------------------------------------------- checkpoints


def _save(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer, state: _State) -> None:
    """Write the checkpoint atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": _cpu_state(model),
        "optimiser": copy.deepcopy(optimiser.state_dict()),
        "epoch": state.epoch,
        "best_score": state.best_score,
        "best_loss": state.best_loss,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "best_state": state.best_state,
        "history": [asdict(log) for log in state.history],
    }
    temp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temp)
    temp.replace(path)


def _restore(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer) -> _State:
    """Load a checkpoint into ``model`` and ``optimiser``; return the loop state it recorded."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimiser.load_state_dict(payload["optimiser"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ModelError(f"checkpoint {path} cannot be resumed: {exc}".splitlines()[0]) from exc
    return _State(
        epoch=int(payload["epoch"]),
        best_score=float(payload["best_score"]),
        best_loss=float(payload["best_loss"]),
        best_epoch=int(payload["best_epoch"]),
        bad_epochs=int(payload["bad_epochs"]),
        best_state=payload["best_state"],
        history=[EpochLog(**log) for log in payload["history"]],
    )


# ----------------------------------------------------------------------------------------- progress


@contextmanager
def _progress(label: str, total: int, enabled: bool) -> Iterator[Callable[[float], None]]:
    """Yield ``tick(loss)``: a tqdm bar when tqdm is installed, else one rewritten line; both on a terminal only."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda loss: None
        return
    try:
        from tqdm import tqdm  # optional: not a dependency
    except ImportError:
        yield from _line_progress(label, total)
        return
    with tqdm(total=total, desc=label, leave=False, file=sys.stderr) as bar:

        def tick(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        yield tick


def _line_progress(label: str, total: int) -> Iterator[Callable[[float], None]]:
    """Yield ``tick(loss)`` that rewrites ``label [#####.....] k/n loss x`` on standard error."""
    done = 0

    def tick(loss: float) -> None:
        nonlocal done
        done += 1
        filled = round(20 * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (20 - filled)}] {done}/{total} loss {loss:.4f}")
        sys.stderr.flush()

    try:
        yield tick
    finally:
        sys.stderr.write("\r" + " " * (len(label) + 50) + "\r")
        sys.stderr.flush()
