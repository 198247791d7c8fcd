"""Training: one readable loop in the style of nanoGPT's ``train.py`` (the :class:`Trainer`). Top-1 evaluation and
BatchNorm recalibration live in :mod:`compressor.evaluation`.

The loop, per step: set the learning rate from :func:`cosine_lr` -> forward (under autocast on CUDA) -> loss
(cross-entropy, or cross-entropy mixed with distillation from a teacher) -> scaled backward -> step ->
``zero_grad(set_to_none=True)``. Methods that act during training (tucker's rank-adaptive steps; masks and scores
later) plug in as :class:`Callback` objects; the loop itself knows nothing about them.

The loop does not assume one process: per-epoch statistics are one tensor on the device (``[loss sum, correct,
seen]``, read once per epoch: a ``.item()`` per step would synchronise CUDA every step, and a distributed run
all-reduces that one tensor before reading it), ``loader.sampler.set_epoch(epoch)`` is called when the loader has
such a sampler, and only the process with ``is_main=True`` prints.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import CompressorError, DataError, InputError
from .evaluation import Batches, evaluate, model_device, modes_kept

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")


# ------------------------------------------------------------------------------------------------ the maths
def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate at ``step`` (0-based) of a linear warm-up followed by a cosine decay to zero.

    .. math::
        \\eta_t = \\eta \\frac{t + 1}{W} \\quad (t < W), \\qquad
        \\eta_t = \\frac{\\eta}{2}\\left(1 + \\cos\\frac{\\pi (t - W)}{T - W}\\right) \\quad (W \\le t \\le T)

    so ``cosine_lr(W, T, lr, W) == lr`` and ``cosine_lr(T, T, lr, W) == 0``; steps past ``T`` stay at zero.
    """
    if step < warmup_steps:  # 1) linear warm-up, never exactly zero
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:  # 2) past the end
        return 0.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 3) cosine from base_lr down to 0
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, temperature: float,
                      alpha: float) -> torch.Tensor:
    """Hinton et al. (2015) knowledge distillation mixed with cross-entropy.

    .. math::
        L = \\alpha\\, T^2\\, \\mathrm{KL}\\big(\\sigma(z_t / T) \\,\\|\\, \\sigma(z_s / T)\\big)
            + (1 - \\alpha)\\, \\mathrm{CE}(z_s, y)

    The :math:`T^2` factor keeps the soft-target gradients on the same scale as the hard ones as T changes.
    References: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """
    student, teacher = student.float(), teacher.float()
    kl = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl + (1.0 - alpha) * F.cross_entropy(student, target)


# ---------------------------------------------------------------------------------------- config and state
@dataclass(frozen=True)
class TrainConfig:
    """What to train with; checked once, on construction (one-line :class:`InputError` on a bad value).

    ``epochs`` passes over the loader (0: :meth:`Trainer.fit` returns at once); peak ``lr`` of a per-step cosine
    schedule; ``optimizer`` ``"sgd"`` (momentum, Nesterov when ``momentum > 0``) or ``"adamw"``; ``weight_decay``
    (L2 for SGD, decoupled for AdamW); ``amp``: float16 autocast + GradScaler, default (None) on for CUDA, only used
    on CUDA; ``distill_temperature`` and ``distill_alpha`` (weight of the distillation term) when a teacher is given;
    ``seed``: ``torch.manual_seed`` before the optimizer is built (dropout, any global-RNG use; batch order and
    augmentation come from the loader's own generator). ``budget_seconds``: train until this much wall-clock time
    has passed (evaluation included), with the cosine schedule over elapsed time instead of steps; ``epochs`` is then
    a cap. The loop stops after the step that crosses the budget (and that epoch's evaluation).
    ``eval_every_seconds``: also evaluate top-1 on the evaluation data each time this much more training time has
    passed (checked after every step), recording the accuracy curve (:attr:`TrainResult.curve`). The time of these
    evaluations is excluded from the time budget and from the curve's minutes (the per-epoch evaluations stay
    included, as above), so a curve point at 5 minutes means 5 minutes of fine-tuning.
    """

    epochs: int
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    amp: bool | None = None
    distill_temperature: float = 4.0
    distill_alpha: float = 0.5
    seed: int = 0
    budget_seconds: float | None = None
    eval_every_seconds: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and self.epochs >= 0,
             f"epochs must be a non-negative integer; got {self.epochs!r}"),
            (_finite(self.lr) and self.lr > 0, f"learning rate must be a positive number; got {self.lr!r}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight decay must be >= 0; got {self.weight_decay!r}"),
            (_finite(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1); got {self.momentum!r}"),
            (self.budget_seconds is None or (_finite(self.budget_seconds) and self.budget_seconds > 0),
             f"the time budget must be a positive number of seconds; got {self.budget_seconds!r}"),
            (self.eval_every_seconds is None or (_finite(self.eval_every_seconds) and self.eval_every_seconds > 0),
             f"the evaluation interval must be a positive number of seconds; got {self.eval_every_seconds!r}"),
            (_finite(self.distill_temperature) and self.distill_temperature > 0
             and _finite(self.distill_alpha) and 0 <= self.distill_alpha <= 1,
             f"distillation needs temperature > 0 and alpha in [0, 1]; got {self.distill_temperature!r}, "
             f"{self.distill_alpha!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainState:
    """What the loop shares with its callbacks. Callbacks may replace ``model`` (in ``on_train_start``, before the
    optimizer is built, and in ``on_train_end``), ``optimizer`` (the loop always reads ``state.optimizer``), and add
    keys to the epoch record ``history[-1]`` in ``on_epoch_end``.

    ``step`` is the 0-based global index of the current step inside the step hooks (it counts the steps done
    elsewhere); ``epoch`` is 1-based; ``lr`` the current step's learning rate; ``loss`` the current step's loss
    (detached, from ``on_after_backward`` on). With ``amp``, gradients seen in ``on_after_backward`` are multiplied
    by ``scaler.get_scale()``.
    """

    model: nn.Module
    config: TrainConfig
    device: torch.device
    amp: bool
    steps_per_epoch: int
    total_steps: int
    teacher: nn.Module | None = None
    optimizer: Any = None  # torch.optim.Optimizer once built, after on_train_start
    scaler: Any = None  # torch.amp.GradScaler
    step: int = 0
    epoch: int = 0
    lr: float = 0.0
    loss: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True
    clock: Callable[[], float] = time.perf_counter
    started: float = 0.0
    paused: float = 0.0  # seconds spent on the curve's evaluations: not training time
    curve: list[dict[str, Any]] = field(default_factory=list)
    next_eval: float = 0.0  # training seconds at which the next curve point is due

    def trained_seconds(self) -> float:
        """Wall-clock seconds since the start, less the curve's evaluations (the per-epoch ones count)."""
        return self.clock() - self.started - self.paused

    def budget_fraction(self) -> float | None:
        """With a time budget, the fraction of it spent (may pass 1); else None."""
        budget = self.config.budget_seconds
        return None if budget is None else self.trained_seconds() / budget

    def out_of_time(self) -> bool:
        fraction = self.budget_fraction()
        return fraction is not None and fraction >= 1.0


class Callback:
    """Base class of training callbacks: every hook is a no-op; override the ones you need.

    Order in one run: ``on_train_start`` (model on the device; optimizer not built yet) -> per step
    ``on_step_start`` (learning rate set, before the forward) -> ``on_after_backward`` (gradients available, before
    ``optimizer.step``) -> ``on_step_end`` (after the step and ``zero_grad``) -> per epoch ``on_epoch_end`` (the
    epoch's record appended to ``state.history``) -> ``on_train_end`` (modes restored; may replace ``state.model``).
    With ``epochs == 0`` no hook runs. A hook that raises ends the run.
    """

    def on_train_start(self, state: TrainState) -> None:
        """Before the optimizer is built: may modify or replace ``state.model`` (e.g. wrap layers)."""

    def on_step_start(self, state: TrainState) -> None:
        """Before the forward of step ``state.step``."""

    def on_after_backward(self, state: TrainState) -> None:
        """Gradients of step ``state.step`` are available; the optimizer has not stepped."""

    def on_step_end(self, state: TrainState) -> None:
        """After ``optimizer.step`` and ``zero_grad`` of step ``state.step``."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After evaluation; ``state.history[-1]`` is this epoch's record."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last epoch: may replace ``state.model`` (e.g. export back to plain modules)."""


@dataclass(frozen=True)
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes
    ----------
    epochs : int
        Epochs run.
    history : list of dict
        One record per epoch: ``epoch`` (1-based), ``loss`` (mean training loss), ``train_acc`` (top-1 on the
        augmented training batches, in [0, 1]), ``eval_acc`` (top-1 on ``eval_loader`` or None), ``lr`` (the last
        step's learning rate) and ``seconds``, plus what callbacks added.
    seconds : float
        Wall time of the whole run.
    device : str
        Device the model was trained on, e.g. ``"cuda:0"``.
    amp : bool
        Whether float16 autocast with a GradScaler was used.
    model : nn.Module
        The trained model: the one given to :meth:`Trainer.fit` (trained in place) unless a callback replaced it.
    curve : list of dict
        With ``eval_every_seconds`` and an ``eval_loader``: top-1 along the way, one record per evaluation:
        ``minutes`` (of training, the curve's evaluations excluded), ``epoch`` (1-based, the one in progress),
        ``step`` (steps done), ``top1`` (in [0, 1]); the last record (``final: True``) is the end of training, its
        top-1 that of the last epoch's evaluation. Empty otherwise.
    """

    epochs: int
    history: list[dict[str, Any]]
    seconds: float
    device: str
    amp: bool
    model: nn.Module
    curve: list[dict[str, Any]] = field(default_factory=list)


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``params`` (callbacks that rebuild it use this too)."""
    if config.optimizer == "sgd":  # nesterov needs momentum > 0
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class _Progress:
    """Per-epoch lines to ``log`` (stderr by default); on a terminal, also a step counter redrawn in place."""

    def __init__(self, enabled: bool, log: Callable[[str], None] | None, epochs: int | str, steps: int) -> None:
        self.enabled, self.epochs, self.steps = enabled, epochs, steps
        self.write = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.live = enabled and log is None and sys.stderr.isatty()
        self.last = time.perf_counter()

    def step(self, epoch: int, step: int) -> None:
        now = time.perf_counter()
        if self.live and (now - self.last > 0.5 or step == self.steps):
            self.last = now
            print(f"\repoch {epoch}/{self.epochs}  step {step}/{self.steps}", end="", file=sys.stderr, flush=True)
        elif self.enabled and not self.live and now - self.last > 60 and step < self.steps:
            self.last = now  # logs and pipes: a line a minute, so long epochs show they are alive
            self.write(f"epoch {epoch}/{self.epochs}  step {step}/{self.steps}")

    def epoch(self, rec: dict[str, Any]) -> None:
        logger.debug("training epoch %s", rec)
        if self.enabled:
            acc = f"  eval {rec['eval_acc']:.2%}" if rec["eval_acc"] is not None else ""
            self.write(f"{chr(13) if self.live else ''}epoch {rec['epoch']}/{self.epochs}  loss {rec['loss']:.4f}  "
                       f"train {rec['train_acc']:.2%}{acc}  lr {rec['lr']:.3g}  {rec['seconds']:.1f}s")


# --------------------------------------------------------------------------------------------------- the loop
class Trainer:
    """Fine-tunes (or trains from scratch) a model with SGD or AdamW, a per-step cosine schedule, AMP on CUDA and
    optional distillation; methods plug in with :class:`Callback` objects.

    Parameters
    ----------
    config : TrainConfig
    device : torch.device or str, optional
        Default: where the model's parameters are.
    callbacks : sequence of Callback
        Called in order at every hook (:meth:`fit` may add more for one run).
    progress : bool
        One line per epoch (and a live step counter on a terminal); ``log`` receives the lines instead of stderr.
    is_main : bool
        False on all but one process of a distributed run: those never print.
    reduce : callable, optional
        Sums a tensor over the processes of a distributed run (epoch statistics, evaluation counts).

    Examples
    --------
    >>> result = Trainer(TrainConfig(epochs=2, lr=0.05), device="cpu").fit(model, loader)  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, *, device: torch.device | str | None = None,
                 callbacks: Sequence[Callback] = (), progress: bool = True, log: Callable[[str], None] | None = None,
                 is_main: bool = True, clock: Callable[[], float] = time.perf_counter,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.config, self.callbacks, self.clock, self.reduce = config, tuple(callbacks), clock, reduce
        self.device = torch.device(device) if device is not None else None
        self.progress, self.log, self.is_main = progress, log, is_main

    def fit(self, model: nn.Module, loader: Batches, *, teacher: nn.Module | None = None,
            eval_loader: Batches | None = None, callbacks: Sequence[Callback] = ()) -> TrainResult:
        """Train ``model`` in place on ``loader`` (batches with a ``len()``) and return what happened.

        With a ``teacher`` the loss is :func:`distillation_loss`; the teacher runs in eval mode without gradients.
        ``eval_loader`` is evaluated after every epoch (``eval_acc``). Train/eval modes are restored at the end.
        ``KeyboardInterrupt`` propagates unchanged (modes restored on the way out; ``on_train_end`` does not run).
        """
        cfg = self.config
        device = self.device if self.device is not None else model_device(model)
        if cfg.amp and device.type != "cuda":
            logger.warning("amp is only used on CUDA; training in float32 on %s", device)
        use_amp = device.type == "cuda" and cfg.amp is not False
        if cfg.epochs == 0:
            return TrainResult(epochs=0, history=[], seconds=0.0, device=str(device), amp=use_amp, model=model)
        steps = _steps_per_epoch(loader)
        if cfg.eval_every_seconds is not None and self.reduce is not None:
            raise InputError("evaluating at fixed times (--eval-every-minutes) is not supported under torchrun: the "
                             "processes' clocks would disagree on when to evaluate together")
        curve = _Curve(cfg.eval_every_seconds, eval_loader)
        hooks = _Hooks((*self.callbacks, *callbacks, curve))
        torch.manual_seed(cfg.seed)
        state = TrainState(model=model.to(device), config=cfg, device=device, amp=use_amp, steps_per_epoch=steps,
                           total_steps=cfg.epochs * steps, teacher=teacher, is_main=self.is_main, clock=self.clock,
                           started=self.clock(), next_eval=cfg.eval_every_seconds or 0.0)
        shown = cfg.epochs if cfg.budget_seconds is None else f"? ({cfg.budget_seconds / 60:g} min budget)"
        bar = _Progress(self.progress and self.is_main, self.log, shown, steps)
        curve.bar = bar
        start = time.perf_counter()
        with modes_kept(model, teacher):
            if teacher is not None:
                teacher.to(device).eval()
            hooks("on_train_start", state)
            params = [p for p in state.model.parameters() if p.requires_grad]
            if not params:
                raise InputError("the model has no trainable parameters (all have requires_grad=False)")
            state.optimizer = make_optimizer(params, cfg)
            state.scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
            for epoch in range(1, cfg.epochs + 1):
                state.epoch, t0 = epoch, time.perf_counter()
                set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
                if set_epoch is not None:  # DistributedSampler: a new shuffle per epoch
                    set_epoch(epoch)
                totals = _run_epoch(state, loader, hooks, bar)
                if self.reduce is not None:  # a distributed run: the statistics of every process
                    totals = self.reduce(totals)
                trained = state.trained_seconds()
                state.history.append(_epoch_record(state, totals, eval_loader, t0, self.reduce))
                hooks("on_epoch_end", state)
                bar.epoch(state.history[-1])
                last = state.out_of_time() or epoch == cfg.epochs
                if last:
                    curve.final(state, trained)
                    break
        hooks("on_train_end", state)
        return TrainResult(epochs=len(state.history), history=state.history, seconds=time.perf_counter() - start,
                           device=str(device), amp=use_amp, model=state.model, curve=state.curve)


class _Curve(Callback):
    """Top-1 on ``eval_loader`` each time another ``every`` seconds of training have passed (checked after each
    step); the evaluation's own time is added to ``state.paused``, so it spends neither the time budget nor the
    curve's minutes. No point once the budget is spent: the last epoch's evaluation gives the final one."""

    def __init__(self, every: float | None, eval_loader: Batches | None) -> None:
        self.every, self.eval_loader = every, eval_loader
        self.bar: _Progress | None = None

    def on_step_end(self, state: TrainState) -> None:
        if self.every is None or self.eval_loader is None:
            return
        trained = state.trained_seconds()
        if trained < state.next_eval or state.out_of_time():
            return
        t0 = state.clock()
        model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        top1 = evaluate(model, self.eval_loader, device=state.device)
        state.paused += state.clock() - t0
        self._add(state, {"minutes": round(trained / 60, 4), "epoch": state.epoch, "step": state.step + 1,
                          "top1": top1})
        state.next_eval = (math.floor(trained / self.every) + 1) * self.every  # the next multiple not yet passed

    def final(self, state: TrainState, trained: float) -> None:
        top1 = state.history[-1]["eval_acc"] if state.history else None
        if self.every is not None and top1 is not None:
            self._add(state, {"minutes": round(trained / 60, 4), "epoch": state.epoch, "step": state.step,
                              "top1": top1, "final": True})

    def _add(self, state: TrainState, point: dict[str, Any]) -> None:
        state.curve.append(point)
        if self.bar is not None and self.bar.enabled:
            self.bar.write(f"{chr(13) if self.bar.live else ''}after {point['minutes']:.2f} min of training (epoch "
                           f"{point['epoch']}, step {point['step']}): top-1 {point['top1']:.2%}")


class _Hooks:
    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = callbacks

    def __call__(self, hook: str, state: TrainState) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(state)


def _steps_per_epoch(loader: Any) -> int:
    if not hasattr(loader, "__len__"):
        raise InputError("the training loader must have a length (batches per epoch) for the cosine schedule")
    if len(loader) == 0:
        raise DataError("the training data yields no batches; it is empty (or smaller than one batch with drop_last)")
    return len(loader)


def _run_epoch(state: TrainState, loader: Batches, hooks: _Hooks, bar: _Progress) -> torch.Tensor:
    """One pass over ``loader``; returns ``[loss sum, correct, seen]`` as one float64 tensor on the device."""
    cfg, device = state.config, state.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    state.model.train()
    for i, (x, y) in enumerate(loader, 1):
        fraction = state.budget_fraction()  # 1) learning rate for this step: by steps, or by time spent
        state.lr = (cosine_lr(state.step, state.total_steps, cfg.lr, 0) if fraction is None
                    else 0.5 * cfg.lr * (1 + math.cos(math.pi * min(fraction, 1.0))))
        for group in state.optimizer.param_groups:
            group["lr"] = state.lr
        hooks("on_step_start", state)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=state.amp):  # 2) forward and loss
            logits = state.model(x)
            if state.teacher is None:
                loss = F.cross_entropy(logits.float(), y)
            else:
                with torch.no_grad():
                    soft = state.teacher(x)
                loss = distillation_loss(logits, soft, y, temperature=cfg.distill_temperature,
                                         alpha=cfg.distill_alpha)
        state.scaler.scale(loss).backward()  # 3) backward, step (skipped by the scaler on inf/nan grads), reset
        state.loss = loss.detach()
        hooks("on_after_backward", state)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        totals[0] += state.loss * len(y)  # 4) statistics stay on the device
        totals[1] += (logits.detach().argmax(dim=1) == y).sum()
        totals[2] += len(y)
        hooks("on_step_end", state)
        state.step += 1
        bar.step(state.epoch, i)
        if state.out_of_time():
            break
    return totals


def _epoch_record(state: TrainState, totals: torch.Tensor, eval_loader: Batches | None, t0: float,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """The epoch's history record (``seconds`` since ``t0``, evaluation included); a diverged loss is a one-line
    error."""
    loss_sum, correct, seen = totals.tolist()
    mean_loss = loss_sum / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise CompressorError(f"fine-tuning diverged: the loss is {mean_loss} in epoch {state.epoch}; "
                              f"lower the learning rate (now {state.config.lr})")
    model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model  # no collectives
    eval_acc = evaluate(model, eval_loader, device=state.device, reduce=reduce) if eval_loader is not None else None
    return {"epoch": state.epoch, "loss": mean_loss, "train_acc": correct / max(seen, 1), "eval_acc": eval_acc,
            "lr": state.lr, "seconds": time.perf_counter() - t0}
