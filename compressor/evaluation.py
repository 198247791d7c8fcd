"""Top-1 evaluation and BatchNorm recalibration: what every stage uses to measure a model (the Trainer, the
pipeline's before/after numbers, stability's interpolation path), with no training in it.

:mod:`compressor.training` imports these for its loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import DataError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def modes_kept(*models: nn.Module | None) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit (a model may mix them, e.g. frozen BatchNorm)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, *, device: torch.device | str | None = None,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Top-1 accuracy of ``model`` over ``loader``, in [0, 1].

    Runs in eval mode without gradients and restores the model's previous train/eval modes. ``device=None`` uses
    the device of the model's parameters; otherwise the model is moved there (and stays). ``reduce`` sums the
    ``[correct, seen]`` counts over the processes of a distributed run (each evaluated its share of the images).
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    with modes_kept(model):
        model.eval()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += (model(x).argmax(dim=1) == y).sum()
            seen += len(y)
    counts = torch.stack([correct, torch.tensor(seen, device=device)])
    right, seen = (int(v) for v in (counts if reduce is None else reduce(counts)).tolist())
    if seen == 0:
        raise DataError("the evaluation data yielded no batches; check that it is not empty")
    return right / seen


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
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    momenta = [m.momentum for m in norms]
    seen = 0
    with modes_kept(model), torch.no_grad():
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
