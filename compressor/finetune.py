"""Fine-tuning after pruning: one readable loop in the style of nanoGPT's ``train.py``, and top-1 evaluation.

The loop, per step: set the learning rate from :func:`cosine_lr` -> forward (under autocast on CUDA) -> loss
(cross-entropy, or cross-entropy mixed with distillation from a teacher) -> scaled backward -> step ->
``zero_grad(set_to_none=True)``. Statistics stay on the device and are read once per epoch (a ``.item()`` per step
would synchronise CUDA every step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CompressorError, DataError, InputError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes
    ----------
    epochs : int
        Epochs run.
    history : list of dict
        One record per epoch: ``epoch`` (1-based), ``loss`` (mean training loss), ``train_acc`` (top-1 on the
        augmented training batches, in [0, 1]), ``eval_acc`` (top-1 on ``eval_loader`` or None), ``lr`` (the last
        step's learning rate) and ``seconds``.
    seconds : float
        Wall time of the whole run.
    device : str
        Device the model was trained on, e.g. ``"cuda:0"``.
    amp : bool
        Whether float16 autocast with a GradScaler was used.
    """

    epochs: int
    history: list[dict[str, Any]]
    seconds: float
    device: str
    amp: bool


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


@contextlib.contextmanager
def _modes_kept(*models: nn.Module | None) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit (a model may mix them, e.g. frozen BatchNorm)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model`` over ``loader``, in [0, 1].

    Runs in eval mode without gradients and restores the model's previous train/eval modes. ``device=None`` uses
    the device of the model's parameters; otherwise the model is moved there (and stays).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    with _modes_kept(model):
        model.eval()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += (model(x).argmax(dim=1) == y).sum()
            seen += len(y)
    if seen == 0:
        raise DataError("the evaluation data yielded no batches; check that it is not empty")
    return int(correct) / seen


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def recalibrate_bn(model: nn.Module, loader: Iterable[tuple[torch.Tensor, Any]], *,
                   device: torch.device | str | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``loader``'s images; return the images used.

    Pruning removes channels that fed the surviving ones, so the stored statistics no longer describe the inputs the
    BNs see; re-estimating them (no gradients, no weight changes) recovers much of the accuracy lost before any
    fine-tuning (Li et al., "EagleEye", ECCV 2020, "adaptive BN"). Statistics are the cumulative average over all
    batches (``momentum=None``); everything but the BN buffers is left as it was, including train/eval modes.
    """
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return 0
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    momenta = [m.momentum for m in norms]
    seen = 0
    with _modes_kept(model), torch.no_grad():
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for x, _ in loader:
                model(x.to(device, non_blocking=True))
                seen += len(x)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    if seen == 0:
        raise DataError("BatchNorm recalibration got no images; check that --data is not empty")
    return seen


def _make_optimizer(params: list[nn.Parameter], name: str, *, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":  # nesterov needs momentum > 0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _check_args(loader: Any, *, epochs: int, lr: float, optimizer: str, temperature: float, alpha: float) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise InputError(f"epochs must be a non-negative integer; got {epochs!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(f"learning rate must be a positive number; got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if not temperature > 0 or not 0.0 <= alpha <= 1.0:
        raise InputError(f"distillation needs temperature > 0 and alpha in [0, 1]; got {temperature!r}, {alpha!r}")
    if not hasattr(loader, "__len__"):
        raise InputError("the training loader must have a length (batches per epoch) for the cosine schedule")


class _Progress:
    """Per-epoch lines to ``log`` (stderr by default); on a terminal, also a step counter redrawn in place."""

    def __init__(self, enabled: bool, log: Callable[[str], None] | None, epochs: int, steps: int) -> None:
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
        logger.debug("finetune epoch %s", rec)
        if self.enabled:
            acc = f"  eval {rec['eval_acc']:.2%}" if rec["eval_acc"] is not None else ""
            self.write(f"{chr(13) if self.live else ''}epoch {rec['epoch']}/{self.epochs}  loss {rec['loss']:.4f}  "
                       f"train {rec['train_acc']:.2%}{acc}  lr {rec['lr']:.3g}  {rec['seconds']:.1f}s")


def finetune(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, epochs: int,
             lr: float = 0.01, optimizer: str = "sgd", weight_decay: float = 5e-4, momentum: float = 0.9,
             device: torch.device | str | None = None, amp: bool | None = None, teacher: nn.Module | None = None,
             distill_temperature: float = 4.0, distill_alpha: float = 0.5, seed: int = 0,
             eval_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` in place with SGD (momentum, Nesterov) or AdamW and a per-step cosine schedule.

    Parameters
    ----------
    model : nn.Module
        Trained in place; moved to ``device``; its train/eval modes are restored at the end.
    loader : iterable of (x, y)
        Training batches with a ``len()`` (e.g. :func:`compressor.data.make_loader` with ``shuffle=True``).
    epochs : int
        Passes over ``loader``; 0 returns at once with an empty history.
    lr, optimizer, weight_decay, momentum
        Peak learning rate, ``"sgd"`` or ``"adamw"``, decoupled (AdamW) or L2 (SGD) decay on all parameters, and
        SGD momentum (Nesterov when > 0).
    device : torch.device or str, optional
        Default: where the model's parameters are.
    amp : bool, optional
        float16 autocast + GradScaler; default on for CUDA. Only used on CUDA (ignored with a warning elsewhere).
    teacher : nn.Module, optional
        With a teacher, the loss is :func:`distillation_loss` with ``distill_temperature`` and ``distill_alpha``
        (the weight of the distillation term). The teacher runs in eval mode without gradients.
    seed : int
        ``torch.manual_seed(seed)`` before building the optimizer (dropout, any global-RNG use). Batch order and
        augmentation come from the loader's own generator.
    eval_loader : iterable of (x, y), optional
        Evaluated after every epoch (``eval_acc``).
    progress : bool
        Print one line per epoch; ``log`` receives the lines instead of stderr when given.

    Returns
    -------
    FinetuneResult

    Notes
    -----
    ``KeyboardInterrupt`` propagates unchanged (modes are restored on the way out); the caller cleans up.
    """
    _check_args(loader, epochs=epochs, lr=lr, optimizer=optimizer, temperature=distill_temperature,
                alpha=distill_alpha)
    device = torch.device(device) if device is not None else _model_device(model)
    if amp and device.type != "cuda":
        logger.warning("amp is only used on CUDA; training in float32 on %s", device)
    use_amp = device.type == "cuda" and amp is not False
    if epochs == 0:
        return FinetuneResult(epochs=0, history=[], seconds=0.0, device=str(device), amp=use_amp)
    steps_per_epoch, total_steps = len(loader), epochs * len(loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise DataError("the training data yields no batches; it is empty (or smaller than one batch with drop_last)")
    torch.manual_seed(seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters (all have requires_grad=False)")
    opt = _make_optimizer(params, optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    bar = _Progress(progress, log, epochs, steps_per_epoch)
    history: list[dict[str, Any]] = []
    start, step = time.perf_counter(), 0
    with _modes_kept(model, teacher):
        if teacher is not None:
            teacher.to(device).eval()
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            for i, (x, y) in enumerate(loader, 1):
                step_lr = cosine_lr(step, total_steps, lr, 0)  # 1) learning rate for this step
                for group in opt.param_groups:
                    group["lr"] = step_lr
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):  # 2) forward and loss
                    logits = model(x)
                    if teacher is None:
                        loss = F.cross_entropy(logits.float(), y)
                    else:
                        with torch.no_grad():
                            soft = teacher(x)
                        loss = distillation_loss(logits, soft, y, temperature=distill_temperature,
                                                 alpha=distill_alpha)
                scaler.scale(loss).backward()  # 3) backward, step (skipped by the scaler on inf/nan grads), reset
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                loss_sum += loss.detach() * len(y)  # 4) statistics stay on the device
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen, step = seen + len(y), step + 1
                bar.step(epoch, i)
            mean_loss = float(loss_sum) / max(seen, 1)
            if not math.isfinite(mean_loss):
                raise CompressorError(f"fine-tuning diverged: the loss is {mean_loss} in epoch {epoch}; "
                                      f"lower the learning rate (now {lr})")
            eval_acc = evaluate(model, eval_loader, device=device) if eval_loader is not None else None
            history.append({"epoch": epoch, "loss": mean_loss, "train_acc": int(correct) / max(seen, 1),
                            "eval_acc": eval_acc, "lr": step_lr, "seconds": time.perf_counter() - t0})
            bar.epoch(history[-1])
    return FinetuneResult(epochs=epochs, history=history, seconds=time.perf_counter() - start, device=str(device),
                          amp=use_amp)
