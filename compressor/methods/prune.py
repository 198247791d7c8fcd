"""Channel pruning as a :class:`~compressor.methods.base.Method`: what every pruning method shares.

A pruning method only decides *which* channels matter: :meth:`PruneMethod.score` returns one score per channel of
every group (higher = keep) and, optionally, its own keep counts (information-based cutoffs choose them). The rest is
common and lives here: the torch-pruning dependency graph and groups (:mod:`compressor.pruning.engine`), the budget
search that turns scores into keep counts meeting the target (:mod:`compressor.pruning.budget`), the physical
removal on a copy with a check after each group, and the replay record (torch-pruning's pruning history). With
``round_to="auto"`` the allocation and removal run at every candidate alignment and the pruned graph measured
fastest is kept (:mod:`compressor.widths`).
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

from .. import widths
from ..errors import InputError, PruningError
from ..metrics import count_macs
from ..pruning import coverage, engine
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
        skipped: list[engine.SkippedGroup] = []
        groups = engine.discover_groups(model, graph, ignore=budget.ignore_layers, skipped=skipped)
        groups, broken = engine.validate_groups(model, example, groups, min_keep=budget.min_keep)
        skipped += broken
        if not groups:
            raise InputError("the model has no prunable channel groups (no Conv2d/Linear feeding another layer)"
                             + _skipped_note(skipped))
        try:
            if budget.round_to == widths.AUTO:
                result = self._apply_auto(model, ctx, graph, groups)
            else:
                round_to = int(budget.round_to)
                scored, seconds = self._score(model, ctx, graph, groups, round_to)
                result = self._prune(model, ctx, groups, scored, seconds, round_to)
        except PruningError as exc:
            if not skipped:
                raise
            raise PruningError(f"{exc}{_skipped_note(skipped)}") from exc
        result.report["skipped"] = [s.row() for s in skipped]
        return result

    def _score(self, model: nn.Module, ctx: MethodContext, graph: tp.DependencyGraph,
               groups: Sequence[PruningGroup], round_to: int) -> tuple[Scores, float]:
        """:meth:`score` with the budget at alignment ``round_to``, and the seconds it took."""
        budget = ctx.budget
        scoring = ScoringContext(model=model, graph=graph, groups=groups, example_input=ctx.example,
                                 target=budget.target, metric=budget.metric, device=ctx.device, seed=ctx.seed,
                                 calib=ctx.calib, num_classes=ctx.num_classes, round_to=round_to,
                                 min_keep=budget.min_keep)
        start = time.perf_counter()
        scored = self.score(scoring)
        return scored, time.perf_counter() - start

    def _prune(self, model: nn.Module, ctx: MethodContext, groups: Sequence[PruningGroup], scored: Scores,
               seconds: float, round_to: int) -> MethodResult:
        """Keep counts (the method's, else the uniform allocation at ``round_to``), physical removal on a copy, the
        report section and the replay record."""
        budget, example = ctx.budget, ctx.example
        keep, allocation = scored.keep, None
        if keep is None:
            allocation = engine.allocate_uniform(model, example, groups, scored.scores, target=budget.target,
                                                 metric=budget.metric, min_keep=budget.min_keep, round_to=round_to)
            keep = allocation.keep
        pruned = copy.deepcopy(model)
        pruned_graph = engine.build_graph(pruned, example)
        channels: dict[str, dict[str, list[int]]] = {}
        with torch.no_grad():
            reference = model(example).shape
            engine.apply_keep(pruned, pruned_graph, groups, scored.scores, keep,
                              check=coverage.output_check(example, reference), channels=channels)
        report = {"scorer": self.name, "prune_target": budget.target, "scoring_seconds": round(seconds, 4),
                  "groups": [_group_row(g, int(keep[g.root]), round_to) for g in groups]}
        if allocation is not None:
            report["allocation"] = allocation.summary()
        if scored.report:
            report[self.name] = scored.report
        record = {"kind": "prune", "history": [list(step) for step in pruned_graph.pruning_history()]}
        return MethodResult(pruned.eval(), [record], report, channels=channels or None)

    def _apply_auto(self, model: nn.Module, ctx: MethodContext, graph: tp.DependencyGraph,
                    groups: Sequence[PruningGroup]) -> MethodResult:
        """``round_to="auto"``: prune at every candidate alignment and keep the one measured fastest by
        ``ctx.latency`` (:func:`compressor.widths.choose_alignment`).

        Scores are computed once and only the allocation and removal are repeated per candidate, unless the method
        chose its own keep counts in :meth:`score` (``cmi``, ``mipp``: their budget search runs at the alignment):
        then :meth:`score` runs once per candidate with that alignment, so their scoring time is multiplied by the
        number of candidates (6 for groups wider than 32 channels); the report's ``alignment.seconds.build`` says
        what it cost. Without ``ctx.latency`` nothing is timed and the alignment is :data:`compressor.widths.UNTIMED`.
        """
        if ctx.latency is None:  # nothing to time on: the fixed fallback, exactly as --round-to 8
            scored, seconds = self._score(model, ctx, graph, groups, widths.UNTIMED)
            result = self._prune(model, ctx, groups, scored, seconds, widths.UNTIMED)
            result.report["alignment"] = {"chosen": widths.UNTIMED, "timed": False, "candidates": []}
            return result
        measure = ctx.latency
        total = engine.measure(model, ctx.example, ctx.budget.metric)
        scorings: list[tuple[Scores, float]] = []
        failed: dict[int, PruningError] = {}

        def build(k: int) -> widths.Built | None:
            try:
                if not scorings or scorings[0][0].keep is not None:
                    scorings.append(self._score(model, ctx, graph, groups, k))
                scored, seconds = scorings[-1]
                result = self._prune(model, ctx, groups, scored, seconds, k)
            except PruningError as exc:
                failed[k] = exc
                return None
            achieved = 1.0 - engine.measure(result.model, ctx.example, ctx.budget.metric) / total
            key = (id(scored), tuple(row["keep"] for row in result.report["groups"]))
            return widths.Built(result.model, achieved, count_macs(result.model, ctx.example), key, result)

        try:
            choice = widths.choose_alignment(widths.candidate_alignments([g.channels for g in groups]), build,
                                             measure)
        except PruningError:
            if not failed:
                raise
            raise failed[min(failed)] from None  # the finest alignment's reason, with its advice
        chosen: MethodResult = choice.built.result
        describe = getattr(measure, "describe", None)
        chosen.report["alignment"] = choice.section(timed=True, **(describe() if callable(describe) else {}))
        return chosen


def _group_row(group: PruningGroup, keep: int, round_to: int) -> dict[str, Any]:
    """One group as the report shows it, with the alignment its keep count got (``round_to``, half of it, ... 1;
    None when the group keeps every channel); ``keep`` is what the group really keeps (a whole number of positions
    per channel block, :func:`~compressor.pruning.engine.effective_keep`)."""
    keep = engine.effective_keep(group, keep)
    row = {"root": group.root, "channels": group.channels, "keep": keep,
           "aligned_to": aligned_to(keep, group.channels, round_to),
           "layers": list(group.out_layers)}
    if group.blocks > 1:
        row["blocks"] = group.blocks
    return row


def _skipped_note(skipped: Sequence[engine.SkippedGroup]) -> str:
    """What an error adds when groups were skipped: how many, and the first one's root and reason."""
    if not skipped:
        return ""
    first = skipped[0]
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    return f" ({len(skipped)} group(s) cannot be pruned and were skipped: {first.root!r}: {first.reason}{more})"


def replay_prune(model: nn.Module, record: Mapping[str, Any], example: torch.Tensor) -> nn.Module:
    """Re-apply a pruning record (torch-pruning's history) to a freshly built model."""
    graph = engine.build_graph(model, example)
    graph.load_pruning_history([list(step) for step in record["history"]])
    return model


register_replay("prune", replay_prune)
