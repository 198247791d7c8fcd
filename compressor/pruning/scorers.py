"""Channel scorers: the plug-in interface that decides *which* channels of a group to keep.

A scorer maps every :class:`~compressor.pruning.engine.PruningGroup` to one score per channel (higher = keep).
It may also choose the keep counts itself (information-based cutoffs do); otherwise the engine allocates them to
meet the target. Register a new scorer with::

    @register_scorer
    class MyScorer(Scorer):
        name = "mine"
        requires_data = True

        def score(self, ctx: ScoringContext) -> ScoringResult: ...
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn

from .._registry import Registry
from .engine import PruningGroup, full_tp_group


@dataclass
class ScoringContext:
    """Everything a scorer may read. Scorers must not modify ``model``.

    Attributes
    ----------
    calib : iterable of (x, y) batches or None
        Normalised calibration batches (``--calib-samples`` images of ``--data``); None when no data was given.
    options : dict
        Method-specific options (e.g. ``cmi_alpha``), as passed to :func:`compressor.compress`.
    """

    model: nn.Module
    graph: tp.DependencyGraph
    groups: Sequence[PruningGroup]
    example_input: torch.Tensor
    target: float
    metric: str
    device: torch.device
    seed: int = 0
    calib: Any = None
    num_classes: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoringResult:
    """Per-group channel scores; optional scorer-chosen keep counts; facts for the report."""

    scores: dict[str, torch.Tensor]
    keep: dict[str, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Scorer(abc.ABC):
    """Base class. ``__init__`` only stores options; all work happens in :meth:`score`."""

    name: ClassVar[str]
    requires_data: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abc.abstractmethod
    def score(self, ctx: ScoringContext) -> ScoringResult:
        """Score every channel of every group in ``ctx.groups``."""


_SCORERS: Registry[type[Scorer]] = Registry("pruning method")


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator adding ``cls`` to the registry under ``cls.name``; duplicate names are an error."""
    return _SCORERS.add(cls.name, cls)


def get_scorer(name: str) -> type[Scorer]:
    """The scorer class registered as ``name``; unknown names list the known ones and close matches."""
    return _SCORERS.get(name)


def list_scorers() -> list[str]:
    return _SCORERS.names()


_CONV_OUT = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels)


@register_scorer
class L1Scorer(Scorer):
    """Filter L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

    For a group whose channels are the outputs of several convs (a residual stream), each conv's filter norms are
    divided by their mean, then averaged over the convs, so no single layer's scale dominates.
    """

    name = "l1"
    description = "filter L1 norm (Li et al. 2017); data-free baseline"

    def score(self, ctx: ScoringContext) -> ScoringResult:
        scores = {}
        for group in ctx.groups:
            total = torch.zeros(group.channels)
            count = torch.zeros(group.channels)
            for item in full_tp_group(ctx.model, ctx.graph, group):
                if item.dep.handler not in _CONV_OUT:
                    continue
                weight = item.dep.target.module.weight.detach().float().cpu()
                norms = weight[list(item.idxs)].abs().flatten(1).sum(1)
                root = torch.as_tensor(item.root_idxs)
                total.index_add_(0, root, norms / norms.mean().clamp_min(1e-12))
                count.index_add_(0, root, torch.ones_like(norms))
            scores[group.root] = total / count.clamp_min(1)
        return ScoringResult(scores)


@register_scorer
class RandomScorer(Scorer):
    """Uniformly random channel scores, seeded: the floor every informed method must beat."""

    name = "random"
    description = "random channels (seeded); sanity baseline"

    def score(self, ctx: ScoringContext) -> ScoringResult:
        generator = torch.Generator().manual_seed(ctx.seed)
        return ScoringResult({g.root: torch.rand(g.channels, generator=generator) for g in ctx.groups})
