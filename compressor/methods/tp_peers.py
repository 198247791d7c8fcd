"""torch-pruning's own importance criteria as methods (``tp-magnitude``, ``tp-taylor``, ...): the peers (issue 13).

A torch-pruning user ranks channels with one of its ``Importance`` classes; these methods run exactly those classes
on the same groups and through the same budget search, removal, reconstruction, fine-tuning and deployment as
``cmi`` and ``mipp``, so every comparison is at equal budget. Only the scores differ; nothing is re-implemented here.

==============  ===========================================  ====================================================
method          torch-pruning importance                     data
==============  ===========================================  ====================================================
tp-magnitude    ``GroupMagnitudeImportance(p=2)``: group L2  none
tp-lamp         ``LAMPImportance`` (Lee et al. 2021)         none
tp-bn           ``BNScaleImportance`` (network slimming)     none
tp-fpgm         ``FPGMImportance`` (He et al. 2019)          none
tp-taylor       ``GroupTaylorImportance`` (Molchanov 2019)   gradients of the loss on the calibration images
tp-hessian      ``GroupHessianImportance`` (OBD, LeCun 1989) squared per-image gradients, first 64 calibration images
==============  ===========================================  ====================================================

Gradients are computed on the model in eval mode (BatchNorm statistics untouched); gradients, ``requires_grad`` and
train/eval flags are restored afterwards, so the scored model is left as it was. The six classes below are
declarations (name, summary, the torch-pruning class, what data it needs); the work is in :class:`TpPeer`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from ..pruning.engine import full_tp_group
from ..evaluation import modes_kept
from .prune import PruneMethod, Scores, ScoringContext

__all__ = ["PEERS", "TpBN", "TpFPGM", "TpHessian", "TpLAMP", "TpMagnitude", "TpTaylor"]

#: Images whose per-image gradients ``tp-hessian`` accumulates (one backward pass each).
HESSIAN_IMAGES = 64


class TpPeer(PruneMethod):
    """Scores = a torch-pruning ``Importance`` evaluated on each group with all its channels."""

    gradients: ClassVar[str] = "none"  # "none", "batch" (summed loss) or "per-image" (squared, accumulated)

    def importance(self) -> Any:
        raise NotImplementedError

    def score(self, ctx: ScoringContext) -> Scores:
        imp = self.importance()
        with _gradients(ctx, imp, self.gradients):
            scores = {}
            for group in ctx.groups:
                values = imp(full_tp_group(ctx.model, ctx.graph, group))
                if values is None:  # no layer of a type the criterion reads: keep the group's channels equal
                    values = torch.ones(group.channels)
                scores[group.root] = torch.nan_to_num(values.detach().float().cpu(), nan=0.0)
        return Scores(scores)


@contextmanager
def _gradients(ctx: ScoringContext, imp: Any, kind: str) -> Iterator[None]:
    """Fill the gradients ``imp`` reads, then clear them (and restore ``requires_grad``) whatever happens."""
    model = ctx.model
    if kind == "none":
        yield
        return
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    with modes_kept(model):
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            model.eval()
            (_batch_gradients if kind == "batch" else _per_image_gradients)(model, imp, ctx)
            yield
        finally:
            for p, flag in zip(params, flags):
                p.grad = None
                p.requires_grad_(flag)


def _batches(ctx: ScoringContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in ctx.calib:
        yield x.to(ctx.device), y.to(ctx.device)


def _batch_gradients(model: nn.Module, _imp: Any, ctx: ScoringContext) -> None:
    """Gradients of the summed cross-entropy over the calibration images (Taylor: ``|w * dL/dw|``)."""
    for x, y in _batches(ctx):
        F.cross_entropy(model(x), y, reduction="sum").backward()


def _per_image_gradients(model: nn.Module, imp: Any, ctx: ScoringContext) -> None:
    """Squared per-image gradients accumulated by the importance (OBD's diagonal Fisher approximation)."""
    imp.zero_grad()
    seen = 0
    for x, y in _batches(ctx):
        for i in range(len(x)):
            if seen >= HESSIAN_IMAGES:
                return
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            imp.accumulate_grad(model)
            seen += 1


class TpMagnitude(TpPeer):
    """Group L2 magnitude, each layer's norms divided by their mean, averaged over the group's layers."""

    name = "tp-magnitude"
    summary = "torch-pruning GroupMagnitudeImportance (group L2 norm); data-free peer"

    def importance(self) -> Any:
        return tp.importance.GroupMagnitudeImportance(p=2)


class TpLAMP(TpPeer):
    """Layer-adaptive magnitude (LAMP, Lee et al., ICLR 2021)."""

    name = "tp-lamp"
    summary = "torch-pruning LAMPImportance (layer-adaptive magnitude); data-free peer"

    def importance(self) -> Any:
        return tp.importance.LAMPImportance(p=2)


class TpBN(TpPeer):
    """BatchNorm scaling factors (Liu et al., "Network Slimming", ICCV 2017)."""

    name = "tp-bn"
    summary = "torch-pruning BNScaleImportance (BatchNorm scales); data-free peer"

    def importance(self) -> Any:
        return tp.importance.BNScaleImportance()


class TpFPGM(TpPeer):
    """Filter pruning via geometric median (He et al., CVPR 2019)."""

    name = "tp-fpgm"
    summary = "torch-pruning FPGMImportance (geometric median); data-free peer"

    def importance(self) -> Any:
        return tp.importance.FPGMImportance(p=2)


class TpTaylor(TpPeer):
    """First-order Taylor expansion of the loss (Molchanov et al., CVPR 2019), gradients on the calibration images."""

    name = "tp-taylor"
    summary = "torch-pruning GroupTaylorImportance (first-order Taylor); peer, needs --data"
    requires_data = True
    gradients = "batch"

    def importance(self) -> Any:
        return tp.importance.GroupTaylorImportance()


class TpHessian(TpPeer):
    """Optimal Brain Damage's diagonal Hessian (LeCun et al. 1989), from squared per-image gradients."""

    name = "tp-hessian"
    summary = "torch-pruning GroupHessianImportance (OBD); peer, needs --data"
    requires_data = True
    gradients = "per-image"

    def importance(self) -> Any:
        return tp.importance.GroupHessianImportance()


PEERS = (TpMagnitude, TpLAMP, TpBN, TpFPGM, TpTaylor, TpHessian)
