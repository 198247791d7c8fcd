"""Channel pruning as a :class:`~compressor.methods.base.Method`: what every pruning method shares.

A pruning method only decides *which* channels matter: :meth:`PruneMethod.score` returns one score per channel of
every group (higher = keep) and, optionally, its own keep counts (information-based cutoffs choose them). The rest is
common and lives here: the torch-pruning dependency graph and groups (:mod:`compressor.pruning.engine`), the budget
search that turns scores into keep counts meeting the target (:mod:`compressor.pruning.budget`), the physical
removal on a copy with a check after each group, and the replay record (torch-pruning's pruning history).
"""

from __future__ import annotations

import abc
import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import InputError
from ..pruning import engine
from ..pruning.budget import aligned_to
from ..pruning.engine import PruningGroup
from .base import Method, MethodContext, MethodResult, register_replay


@dataclass
class ScoringContext:
    """What :meth:`PruneMethod.score` reads. Scorers must not modify ``model``.

    ``target``/``metric``/``round_to``/``min_keep`` are the budget of this pruning step (in a chain, the pruning
    share of ``--target``); ``calib`` holds normalised calibration batches or None.
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
    round_to: int = 1
    min_keep: float = 0.1


@dataclass(frozen=True)
class Scores:
    """Per-group channel scores (higher = keep), optional method-chosen keep counts, and facts for the report."""

    scores: dict[str, torch.Tensor]
    keep: dict[str, int] | None = None
    report: dict[str, Any] = field(default_factory=dict)


class PruneMethod(Method):
    """Base class of channel-pruning methods: subclasses implement :meth:`score`."""

    default_metric = "filters"

    @abc.abstractmethod
    def score(self, ctx: ScoringContext) -> Scores:
        """Score every channel of every group in ``ctx.groups``."""

    def apply(self, model: nn.Module, ctx: MethodContext) -> MethodResult:
        budget, example = ctx.budget, ctx.example
        graph = engine.build_graph(model, example)
        groups = engine.discover_groups(model, graph, ignore=budget.ignore_layers)
        if not groups:
            raise InputError("the model has no prunable channel groups (no Conv2d/Linear feeding another layer)")
        scoring = ScoringContext(model=model, graph=graph, groups=groups, example_input=example,
                                 target=budget.target, metric=budget.metric, device=ctx.device, seed=ctx.seed,
                                 calib=ctx.calib, num_classes=ctx.num_classes, round_to=budget.round_to,
                                 min_keep=budget.min_keep)
        start = time.perf_counter()
        scored = self.score(scoring)
        seconds = time.perf_counter() - start
        keep, allocation = scored.keep, None
        if keep is None:
            allocation = engine.allocate_uniform(model, example, groups, scored.scores, target=budget.target,
                                                 metric=budget.metric, min_keep=budget.min_keep,
                                                 round_to=budget.round_to)
            keep = allocation.keep
        pruned = copy.deepcopy(model)
        pruned_graph = engine.build_graph(pruned, example)
        with torch.no_grad():
            reference = model(example).shape
            engine.apply_keep(pruned, pruned_graph, groups, scored.scores, keep,
                              check=_output_check(example, reference))
        report = {"scorer": self.name, "prune_target": budget.target, "scoring_seconds": round(seconds, 4),
                  "groups": [_group_row(g, int(keep[g.root]), budget.round_to) for g in groups]}
        if allocation is not None:
            report["allocation"] = allocation.summary()
        if scored.report:
            report[self.name] = scored.report
        record = {"kind": "prune", "history": [list(step) for step in pruned_graph.pruning_history()]}
        return MethodResult(pruned.eval(), [record], report)


def _group_row(group: PruningGroup, keep: int, round_to: int) -> dict[str, Any]:
    """One group as the report shows it, with the alignment its keep count got (``round_to``, half of it, ... 1;
    None when the group keeps every channel)."""
    return {"root": group.root, "channels": group.channels, "keep": keep,
            "aligned_to": aligned_to(keep, group.channels, round_to),
            "layers": list(group.out_layers)}


def _output_check(example: torch.Tensor, reference: torch.Size):
    """A check run after each pruned group: same output shape, finite values."""

    def check(model: nn.Module) -> None:
        out = model(example)
        if out.shape != reference or not torch.isfinite(out).all():
            raise ValueError(f"output shape {tuple(out.shape)} (expected {tuple(reference)}) or non-finite values")

    return check


def replay_prune(model: nn.Module, record: Mapping[str, Any], example: torch.Tensor) -> nn.Module:
    """Re-apply a pruning record (torch-pruning's history) to a freshly built model."""
    graph = engine.build_graph(model, example)
    graph.load_pruning_history([list(step) for step in record["history"]])
    return model


register_replay("prune", replay_prune)
