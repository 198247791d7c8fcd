"""Structured pruning engine: groups, measurement of allocations, physical channel removal, validation.

The engine finds the groups and removes channels with torch-pruning's ``DependencyGraph``; pruning methods
(:class:`compressor.methods.prune.PruneMethod`) decide *which* channels, and the budget search
(:mod:`compressor.pruning.budget`) *how many* per group, measuring candidate allocations with :func:`meter`.
A group is the set of layers whose channels must change together (a residual stream, a conv and its BN and
consumers, a depthwise conv and its producer, a concat).

Target convention: ``target`` is the fraction *removed*, of one metric:

* ``filters``: conv output channels summed over all ``Conv2d`` layers (default for pruning);
* ``params``: all parameters;
* ``macs``: multiply-accumulates of ``Conv2d`` and ``Linear`` layers for one image (see :mod:`compressor.metrics`).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import InputError, PruningError
from ..metrics import count_filters, count_macs, count_params
from . import budget, coverage
from .budget import TARGET_TOLERANCE, floor_keep, round_up
from .coverage import SkippedGroup
from .shortcut import customized_pruners

__all__ = [
    "METRICS", "TARGET_TOLERANCE", "PruningGroup", "SkippedGroup", "allocate_uniform", "apply_keep", "build_graph",
    "discover_groups", "effective_keep", "floor_keep", "full_tp_group", "lowest_scored", "measure", "meter",
    "producer_segments", "reaches_prunable", "record_kept", "removed_fraction", "uniform_keep", "validate_groups",
]

METRICS = ("filters", "params", "macs")


@dataclass(frozen=True)
class PruningGroup:
    """Channels that must be pruned together, identified by the name of the layer whose outputs are the root.

    Attributes
    ----------
    root : str
        Module name of the root layer (its output channels index the group).
    channels : int
        Number of prunable channels.
    out_layers : tuple of str
        Conv/Linear layers whose *output* channels are removed with the group (a residual stream has several).
    in_layers : tuple of str
        Layers whose *input* channels are removed with the group.
    blocks : int
        Channel blocks of a grouped convolution or GroupNorm in the group (:func:`coverage.channel_blocks`): every
        block keeps the same positions, so the group keeps a multiple of ``blocks`` channels (1: no constraint).
    """

    root: str
    channels: int
    out_layers: tuple[str, ...]
    in_layers: tuple[str, ...]
    blocks: int = 1


#: Per graph, the nodes whose torch-pruning index mapping failed (their groups are skipped, see ``discover_groups``).
_UNMAPPED: weakref.WeakKeyDictionary[tp.DependencyGraph, dict[Any, str]] = weakref.WeakKeyDictionary()
_INDEX_MAPPING_FILE = Path(tp.dependency.index_mapping.__file__).name


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` into a torch-pruning dependency graph that understands :class:`ChannelShortcut` and the
    model's unwrapped parameters (:func:`coverage.unwrapped_parameters`: layer scale).

    When torch-pruning's index-mapping update fails on a node (a channel shuffle's reshape), the other nodes are
    mapped one by one and the failed ones remembered, so that :func:`discover_groups` skips only their groups.
    Any other torch-pruning failure is a :class:`PruningError` (the model cannot be traced for pruning).
    """
    model.eval()
    graph = tp.DependencyGraph()
    declared, unknown = coverage.unwrapped_parameters(graph, model)
    try:
        graph.build_dependency(
            model, example_inputs=example_input, customized_pruners=customized_pruners(), verbose=False,
            unwrapped_parameters=[tp._helpers.UnwrappedParameters(p, dim) for p, dim in declared],
            ignored_params=unknown)
    except Exception as exc:  # noqa: BLE001 - torch-pruning's own failure, turned into a group skip or exit 2
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(Path(tb.tb_frame.f_code.co_filename).name)
            tb = tb.tb_next
        if _INDEX_MAPPING_FILE not in frames:
            raise PruningError(f"torch-pruning cannot trace the model for pruning ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        _UNMAPPED[graph] = coverage.index_mapping_failures(graph)
    return graph


def _output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers that produce the model's output (classifier outputs are never pruned)."""
    layers: list[nn.Module] = []
    for module, node in graph.module2node.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not reaches_prunable(node):
            layers.append(module)
    return layers


def reaches_prunable(node: Any) -> bool:
    """True when a Conv/Linear lies downstream of ``node`` (so its outputs are not the model's output)."""
    stack, seen = list(node.outputs), set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current.module, (nn.Conv2d, nn.Linear)):
            return True
        stack.extend(current.outputs)
    return False


def _names_to_modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    found = []
    for name in names:
        if name not in modules:
            prunable = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
            raise InputError(
                f"--ignore-layer {name!r} is not a layer of the model; conv/linear layers are: "
                f"{', '.join(prunable[:8])}{' ...' if len(prunable) > 8 else ''}"
            )
        found.append(modules[name])
    return found


def discover_groups(
    model: nn.Module, graph: tp.DependencyGraph, *, ignore: Sequence[str] = (),
    skipped: list[SkippedGroup] | None = None,
) -> list[PruningGroup]:
    """All prunable groups of ``model``, excluding those that touch an ignored or an output layer and those whose
    channel indices torch-pruning cannot map (:func:`coverage.barrier`: a channel shuffle), which are appended to
    ``skipped`` when it is given."""
    names = {m: n for n, m in model.named_modules()}
    ignored = _names_to_modules(model, ignore) + _output_layers(graph)
    unmapped = _UNMAPPED.get(graph, {})
    groups: list[PruningGroup] = []
    for root, group, error in coverage.all_groups(graph, ignored, (nn.Conv2d, nn.Linear)):
        if group is None:
            if skipped is not None and root in names:
                failure = f"torch-pruning fails to map its channel indices ({str(error)[:200]}; e.g. a channel shuffle)"
                skipped.append(SkippedGroup(names[root], (names[root],), failure))
            continue
        reason = coverage.barrier(group, unmapped)
        outs: list[str] = []
        ins: list[str] = []
        for dep, _ in group:
            module = dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear)) or module not in names:
                continue
            target = outs if graph.is_out_channel_pruning_fn(dep.handler) else ins
            if names[module] not in target:
                target.append(names[module])
        channels = graph.get_out_channels(root)
        if not channels or channels <= 1 or root not in names:
            continue
        if reason is not None:
            if skipped is not None:
                skipped.append(SkippedGroup(names[root], tuple(outs), reason))
            continue
        blocks = coverage.channel_blocks(group)
        if channels % blocks or channels == blocks:
            if skipped is not None and channels % blocks:
                skipped.append(SkippedGroup(names[root], tuple(outs), f"{channels} channels do not split into the "
                                            f"{blocks} blocks of its grouped layers"))
            continue
        groups.append(PruningGroup(names[root], int(channels), tuple(outs), tuple(ins), blocks))
    return groups


def validate_groups(model: nn.Module, example: torch.Tensor, groups: Sequence[PruningGroup], *,
                    min_keep: float) -> tuple[list[PruningGroup], list[SkippedGroup]]:
    """The groups that prune without breaking ``model`` and the skipped rest (:func:`coverage.validate`: each group
    pruned to its floor on a copy, the model run after each)."""

    def prune(trial: nn.Module, graph: tp.DependencyGraph, chosen: Sequence[PruningGroup], keep: Mapping[str, int],
              check: Callable[[nn.Module], None]) -> None:
        scores = {g.root: torch.arange(g.channels, 0, -1, dtype=torch.float32) for g in chosen}
        apply_keep(trial, graph, chosen, scores, keep, check=check)

    return coverage.validate(model, example, groups, min_keep=min_keep, prune=prune, build=build_graph)


def effective_keep(group: PruningGroup, keep: int) -> int:
    """Channels ``group`` really keeps for a requested ``keep``: rounded up to a whole number per channel block."""
    return min(group.channels, round_up(int(keep), group.blocks))


def full_tp_group(model: nn.Module, graph: tp.DependencyGraph, group: PruningGroup) -> tp.dependency.Group:
    """The torch-pruning group of ``group`` with all channel indices (what importance functions expect)."""
    root = dict(model.named_modules())[group.root]
    fn = graph.get_pruner_of_module(root).prune_out_channels
    return graph.get_pruning_group(root, fn, list(range(group.channels)))


def uniform_keep(
    groups: Sequence[PruningGroup], ratio: float, *, min_keep: float, round_to: int
) -> dict[str, int]:
    """Keep ``C * (1 - ratio)`` channels per group, rounded to the nearest multiple of ``round_to``, floored."""
    keep = {}
    for g in groups:
        k = g.channels * (1.0 - ratio)
        k = int(round(k / round_to) * round_to) if round_to > 1 else int(round(k))
        keep[g.root] = min(g.channels, max(floor_keep(g.channels, min_keep=min_keep, round_to=round_to), k))
    return keep


def apply_keep(
    model: nn.Module,
    graph: tp.DependencyGraph,
    groups: Sequence[PruningGroup],
    scores: Mapping[str, torch.Tensor],
    keep: Mapping[str, int],
    *,
    check: Callable[[nn.Module], None] | None = None,
    channels: dict[str, dict[str, list[int]]] | None = None,
) -> dict[str, list[int]]:
    """Remove, in place, the lowest-scored ``C - keep`` channels of every group; return the removed indices.

    ``check`` runs after each group so a group that breaks the model is named (never silently mis-pruned).
    ``channels``, when given, is filled with the original indices every touched ``Conv2d``/``Linear`` kept
    (``{name: {"in": [...], "out": [...]}}``, see :func:`record_kept`), for :mod:`compressor.reconstruct`.
    """
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    removed: dict[str, list[int]] = {}
    for g in groups:
        n_drop = g.channels - effective_keep(g, keep[g.root])
        if n_drop <= 0:
            continue
        idxs = _chosen(scores[g.root], n_drop, producer_segments(model, graph, g), g.blocks)
        root = modules[g.root]
        try:
            tp_group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs)
            if channels is not None:
                record_kept(channels, graph, tp_group, names)
            tp_group.prune()
            if check is not None:
                check(model)
        except Exception as exc:  # noqa: BLE001 - any failure here means this group is not safely prunable
            raise PruningError(
                f"pruning the group rooted at layer {g.root!r} "
                f"(also {', '.join(g.out_layers[1:3]) or 'no other layer'})"
                f" breaks the model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''});"
                f" exclude it with --ignore-layer {g.root}"
            ) from exc
        removed[g.root] = idxs
    return removed


def _chosen(scores: torch.Tensor, n_drop: int, segments: Sequence[set[int]], blocks: int) -> list[int]:
    """:func:`lowest_scored`, by position when the channels fall into ``blocks`` blocks: a position's score is its
    mean over the blocks, and the same ``n_drop / blocks`` positions go from every block (torch-pruning's grouped
    convolution rule)."""
    if blocks <= 1:
        return lowest_scored(scores, n_drop, segments)
    size = scores.numel() // blocks
    position_scores = scores.detach().float().cpu().reshape(blocks, size).mean(0)
    positions = lowest_scored(position_scores, n_drop // blocks, [{c % size for c in seg} for seg in segments])
    return sorted(p + b * size for b in range(blocks) for p in positions)


_PRODUCERS = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels)


def producer_segments(model: nn.Module, graph: tp.DependencyGraph, group: PruningGroup) -> list[set[int]]:
    """The group's channels that each producing layer makes (all of them for a residual stream; one branch's for a
    concat), as sets of the group's channel indices."""
    return [set(int(i) for i in item.root_idxs) for item in full_tp_group(model, graph, group)
            if item.dep.handler in _PRODUCERS]


def lowest_scored(scores: torch.Tensor, n_drop: int, segments: Sequence[set[int]] = ()) -> list[int]:
    """The ``n_drop`` lowest-scored channels (ties: the lower index), skipping any whose removal would leave a
    segment (the channels one layer produces, e.g. one branch of a concat) empty: a layer never loses all its
    outputs. Sorted.

    >>> lowest_scored(torch.tensor([0.1, 0.2, 0.9, 0.8]), 2, [{0, 1}, {2, 3}])
    [0, 3]
    """
    order = torch.argsort(scores.detach().float().cpu(), stable=True).tolist()
    left = [len(seg) for seg in segments]
    member = {c: [k for k, seg in enumerate(segments) if c in seg] for c in order}
    drop: list[int] = []
    for c in order:
        if len(drop) == n_drop:
            break
        if any(left[k] <= 1 for k in member[c]):
            continue
        for k in member[c]:
            left[k] -= 1
        drop.append(int(c))
    return sorted(drop)


def record_kept(channels: dict[str, dict[str, list[int]]], graph: tp.DependencyGraph, tp_group: Any,
                names: Mapping[int, str]) -> None:
    """Before ``tp_group`` is pruned: update, per ``Conv2d``/``Linear`` it touches, the original indices of the input
    and output channels that stay. torch-pruning's indices address the tensor as it is at that moment, so applying
    each step to the running list of kept originals keeps the map right across groups (a concat consumer's input is
    pruned once per branch)."""
    for dep, idxs in tp_group:
        module = dep.target.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or id(module) not in names:
            continue
        out_dim = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        in_dim = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        entry = channels.setdefault(names[id(module)], {"in": list(range(in_dim)), "out": list(range(out_dim))})
        side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else (
            "in" if graph.is_in_channel_pruning_fn(dep.handler) else None)
        if side is None:
            continue
        drop = {int(getattr(i, "idx", i)) for i in idxs}
        entry[side] = [c for j, c in enumerate(entry[side]) if j not in drop]


def measure(model: nn.Module, example_input: torch.Tensor, metric: str) -> int:
    """The value of ``metric`` (filters, params or macs) for ``model``."""
    if metric == "filters":
        return count_filters(model)
    if metric == "params":
        return count_params(model)
    return count_macs(model, example_input)


def removed_fraction(
    model: nn.Module,
    example_input: torch.Tensor,
    groups: Sequence[PruningGroup],
    scores: Mapping[str, torch.Tensor],
    keep: Mapping[str, int],
    *,
    metric: str,
    total: int | None = None,
) -> float:
    """Fraction of ``metric`` that keeping ``keep[g]`` channels per group removes (``model`` is not modified).

    Measured on a pruned copy: a closed form would be wrong for concat groups (a channel of the concat removes a
    filter from only one branch) and for params/MACs (a layer's cost depends on the channels kept on both sides).
    """
    total = total if total is not None else measure(model, example_input, metric)
    pruned = copy.deepcopy(model)
    apply_keep(pruned, build_graph(pruned, example_input), groups, scores, keep)
    return 1.0 - measure(pruned, example_input, metric) / total


def meter(
    model: nn.Module,
    example_input: torch.Tensor,
    groups: Sequence[PruningGroup],
    scores: Mapping[str, torch.Tensor] | None,
    *,
    metric: str,
) -> budget.Meter:
    """A :class:`~compressor.pruning.budget.Meter` of ``metric`` for ``model``: :func:`removed_fraction` of an
    allocation, with ``scores`` (or the scores passed with the allocation) choosing the channels removed."""
    if metric not in METRICS:
        raise InputError(f"unknown target metric {metric!r}; use one of {', '.join(METRICS)}")
    total = measure(model, example_input, metric)

    def fraction(keep: Mapping[str, int], given: Mapping[str, torch.Tensor] | None) -> float:
        chosen = given if given is not None else scores
        if chosen is None:
            chosen = {g.root: torch.arange(g.channels, 0, -1, dtype=torch.float32) for g in groups}
        return removed_fraction(model, example_input, groups, chosen, keep, metric=metric, total=total)

    return budget.Meter([g.root for g in groups], fraction)


def allocate_uniform(
    model: nn.Module,
    example_input: torch.Tensor,
    groups: Sequence[PruningGroup],
    scores: Mapping[str, torch.Tensor],
    *,
    target: float,
    metric: str,
    min_keep: float,
    round_to: int,
) -> budget.Allocation:
    """Keep counts, shrinking all groups at the same relative pace, that remove ``target`` of ``metric``.

    Walks :func:`~compressor.pruning.budget.removal_schedule` in blocks of ``round_to`` and bisects on the number of
    steps (the removed fraction grows with it), under the policy of :mod:`compressor.pruning.budget`: when aligned
    blocks are too coarse to land within ±2 points, the walk continues from the last prefix under the target with
    half the alignment (8, 4, 2, 1), so only a few groups end less aligned (``Allocation.aligned_to`` says which).
    """
    measured = meter(model, example_input, groups, scores, metric=metric)
    return budget.allocate_uniform(groups, measured, target=target, metric=metric, min_keep=min_keep,
                                   round_to=round_to)
