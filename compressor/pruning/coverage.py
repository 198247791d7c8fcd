"""What torch-pruning can and cannot prune in a model, and the groups left alone, with the reason (issue 17).

The engine (:mod:`compressor.pruning.engine`) prunes through torch-pruning's ``DependencyGraph``. This module
covers the structures of common CNNs with torch-pruning's own mechanisms and keeps out, *as groups*, what it cannot
map, so that one such structure costs its groups, never the run:

* **unwrapped parameters** (ConvNeXt's layer scale ``gamma``, shape ``(C, 1, 1)`` or ``(C,)``): declared to
  torch-pruning with ``unwrapped_parameters`` and the dimension that indexes channels, the only one larger than 1
  (:func:`unwrapped_parameters`); one with several such dimensions cannot be placed and is passed as
  ``ignored_params``, so a group that would need it fails validation and is skipped;
* **grouped convolutions** (ResNeXt, RegNet) and ``GroupNorm``: torch-pruning removes the same positions in every
  channel block (its ``MetaPruner`` repeats the indices per group, ``ConvPruner.prune_in_channels`` keeps the first
  block's); :func:`channel_blocks` gives the number of blocks a group's channels fall into, and the engine chooses
  positions by the mean score over the blocks;
* **reshapes of the channel dimension other than a flatten into a Linear layer** (ShuffleNet's channel shuffle,
  ``view(n, g, c/g, h, w)``, transpose, ``view(n, c, h, w)``): torch-pruning maps indices through a reshape as a
  flatten, which a shuffle is not (its index mapping then fails with ``ZeroDivisionError`` or returns channels out
  of range). :func:`barrier` names such a node in a group, and the group is skipped;
* **anything else that breaks the model when pruned** (a hard-coded ``x.view(-1, 4*4*50)``, an op torch-pruning
  does not know): :func:`validate` prunes every group to its floor on a copy, runs the model after each, and skips
  the groups that raise or change the output shape.

A torch-pruning failure while mapping indices (:func:`index_mapping_failures`) no longer aborts graph building:
the other nodes are mapped one by one, and the groups through a failed node are skipped by :func:`barrier`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping

from .budget import floor_keep

__all__ = ["SkippedGroup", "all_groups", "barrier", "channel_blocks", "index_mapping_failures", "output_check",
           "unwrapped_parameters", "validate"]

OPTYPE = tp.ops.OPTYPE

#: torch-pruning's per-op index-mapping updates, as ``index_mapping.update_index_mapping`` dispatches them.
_MAPPERS: dict[Any, Callable[[Any, Any], None]] = {
    OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
    OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
    OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
    OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
    OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
    OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
}


@dataclass(frozen=True)
class SkippedGroup:
    """A group left unpruned: its root layer, the layers whose outputs it would have cut, and why."""

    root: str
    layers: tuple[str, ...]
    reason: str

    def row(self) -> dict[str, Any]:
        """As the report lists it."""
        return {"root": self.root, "layers": list(self.layers), "reason": self.reason}


def unwrapped_parameters(graph: tp.DependencyGraph, model: nn.Module
                         ) -> tuple[list[tuple[nn.Parameter, int]], list[nn.Parameter]]:
    """Parameters held by modules torch-pruning has no pruner for (layer scale), as ``(parameter, channel dim)`` for
    ``build_dependency(unwrapped_parameters=...)``, and those whose channel dimension cannot be told (more than one
    dimension larger than 1), for ``ignored_params``. Same notion of "unwrapped" as torch-pruning's own detection
    (``DependencyGraph._detect_unwrapped_parameters``), which otherwise warns and guesses the last such dimension."""
    wrapped: set[int] = set()
    for module in model.modules():
        op = tp.ops.module2type(module)
        if (op in graph.REGISTERED_PRUNERS and op != OPTYPE.ELEMENTWISE) or type(module) in graph.CUSTOMIZED_PRUNERS:
            wrapped.update(id(p) for p in module.parameters())
    declared: list[tuple[nn.Parameter, int]] = []
    unknown: list[nn.Parameter] = []
    for param in model.parameters():
        if id(param) in wrapped:
            continue
        dims = [d for d, size in enumerate(param.shape) if size > 1]
        if len(dims) == 1:
            declared.append((param, dims[0]))
        elif dims:
            unknown.append(param)
    return declared, unknown


def index_mapping_failures(graph: tp.DependencyGraph) -> dict[Any, str]:
    """Run torch-pruning's index-mapping update node by node (what ``build_dependency`` does last, in one loop that
    a single failing node aborts); return the nodes whose update raised, with the error.

    torch-pruning repeats the whole update in every ``get_pruning_group`` call, so a failed node would fail every
    later group too: it is retyped as an element-wise op (no index mapping, the way torch-pruning itself retypes
    customised layers), and :func:`barrier` skips every group through it.
    """
    failed: dict[Any, str] = {}
    for node in graph.module2node.values():
        mapper = _MAPPERS.get(node.type)
        if mapper is None:
            continue
        try:
            mapper(graph, node)
        except Exception as exc:  # noqa: BLE001 - torch-pruning cannot map this node; its groups are skipped
            failed[node] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            node.type = OPTYPE.ELEMENTWISE
    return failed


def all_groups(graph: tp.DependencyGraph, ignored: Sequence[nn.Module], root_types: tuple[type, ...]
               ) -> Iterator[tuple[nn.Module, Any, str | None]]:
    """``(root, group, None)`` for every group of torch-pruning's ``DependencyGraph.get_all_groups``, and
    ``(root, None, error)`` for a root whose group torch-pruning fails to build.

    The same walk as ``get_all_groups`` (every root module not yet covered by an earlier group's output channels;
    a group that touches an ignored layer is dropped), with the group building guarded per root: the library's
    generator stops at the first root whose index mapping raises (a split after a channel shuffle), which would
    lose every later group.
    """
    visited: set[int] = set()
    ignored_ids = {id(m) for m in [*ignored, *graph.IGNORED_LAYERS_IN_TRACING]}
    for module in list(graph.module2node):
        if not isinstance(module, nn.Module) or not isinstance(module, root_types) or id(module) in ignored_ids \
                or id(module) in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                            list(range(pruner.get_out_channels(module))))
        except Exception as exc:  # noqa: BLE001 - torch-pruning cannot build this group; it is skipped
            yield module, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            continue
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                prunable = prunable and id(dep.target.module) not in ignored_ids
        if prunable:
            yield module, group, None


def _input_rank(node: Any) -> int | None:
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None) or getattr(node.grad_fn, "_saved_self_sizes", None)
    return len(sizes) if sizes is not None else None


def _feeds_only_linear(node: Any) -> bool:
    """Whether every path from ``node`` reaches a ``Linear`` before any other layer with weights."""
    stack, seen, found = list(node.outputs), set(), False
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current.module, nn.Linear):
            found = True
        elif isinstance(current.module, nn.Module) and any(True for _ in current.module.parameters(recurse=False)):
            return False
        elif current.type == OPTYPE.OUTPUT:
            continue
        else:
            stack.extend(current.outputs)
    return found


def barrier(tp_group: Any, failed: dict[Any, str]) -> str | None:
    """Why torch-pruning cannot map ``tp_group``'s channel indices, or None.

    A reshape node is safe when its input is ``(N, C)`` or ``(N, C, 1, 1)``-like (rank 2 or 3: the channels keep
    their index) or when it flattens a rank-4 map into ``Linear`` layers (torch-pruning's flatten mapping, stride
    ``H*W``). Any other reshape on the channel path (a channel shuffle's 5-D view and its inverse) is a barrier, as
    is a node whose index mapping failed (:func:`index_mapping_failures`).
    """
    for dep, _ in tp_group:
        for node in (dep.source, dep.target):
            if node in failed:
                return ("its channels pass through a reshape (or another op) that torch-pruning cannot map channel "
                        f"indices through ({failed[node]}; e.g. a channel shuffle)")
            if node.type != OPTYPE.RESHAPE:
                continue
            rank = _input_rank(node)
            if rank is not None and rank <= 3:
                continue
            if rank == 4 and _feeds_only_linear(node):
                continue
            return ("its channels pass through a reshape of the channel dimension that is not a flatten into a "
                    "Linear layer (e.g. a channel shuffle); torch-pruning cannot map channel indices through it")
    return None


def channel_blocks(tp_group: Any) -> int:
    """Number of blocks the group's channels fall into: the least common multiple of the ``groups`` of every
    grouped (not depthwise) convolution and the ``num_groups`` of every ``GroupNorm`` in the group (1: none).

    Every block must keep the same positions (torch-pruning's handling of grouped layers), so a group of ``C``
    channels in ``B`` blocks is pruned in steps of ``B`` channels, one position of ``C / B`` at a time.
    """
    blocks = 1
    for dep, _ in tp_group:
        module = dep.target.module
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not (
                module.groups == module.out_channels == module.in_channels):
            blocks = math.lcm(blocks, int(module.groups))
        elif isinstance(module, nn.GroupNorm) and module.num_groups > 1:
            blocks = math.lcm(blocks, int(module.num_groups))
    return blocks


def output_check(example: torch.Tensor, reference: torch.Size) -> Callable[[nn.Module], None]:
    """A check run after each pruned group: the model runs on ``example``, same output shape, finite values."""

    def check(model: nn.Module) -> None:
        out = model(example)
        if out.shape != reference or not torch.isfinite(out).all():
            raise ValueError(f"output shape {tuple(out.shape)} (expected {tuple(reference)}) or non-finite values")

    return check


def validate(model: nn.Module, example: torch.Tensor, groups: Sequence[Any], *, min_keep: float,
             prune: Callable[..., Any], build: Callable[[nn.Module, torch.Tensor], Any]
             ) -> tuple[list[Any], list[SkippedGroup]]:
    """Split ``groups`` into those that prune cleanly and those that break the model (skipped, with the error).

    On a copy of ``model``, every group is pruned to its floor (``max(1, ceil(min_keep * C))`` channels, the most
    any allocation removes) with ``prune(copy, graph, [group], keep, check)`` (the engine's removal), and the model
    is run after each. When a group fails, it is skipped and the pass restarts on a fresh copy without it (the
    failed removal may have left the copy half pruned), so a model costs one copy per failing group, plus one.
    """
    with torch.no_grad():
        reference = model.eval()(example).shape
    check = output_check(example, reference)
    remaining, skipped = list(groups), []
    while remaining:
        trial = copy.deepcopy(model)
        graph = build(trial, example)
        broken = None
        for group in remaining:
            keep = {group.root: floor_keep(group.channels, min_keep=min_keep, round_to=1)}
            try:
                with torch.no_grad():
                    prune(trial, graph, [group], keep, check)
            except Exception as exc:  # noqa: BLE001 - whatever breaks is reported as the group's reason
                broken = (group, exc.__cause__ or exc)
                break
        if broken is None:
            break
        group, cause = broken
        text = str(cause).splitlines()[0] if str(cause) else ""
        skipped.append(SkippedGroup(group.root, tuple(group.out_layers),
                                    f"pruning it breaks the model ({type(cause).__name__}: {text[:200]})"))
        remaining.remove(group)
    return remaining, skipped
