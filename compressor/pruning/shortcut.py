"""Teach torch-pruning's dependency graph the option-A shortcut.

torch-pruning cannot follow ``F.pad`` on the channel dimension, so pruning the residual stream through the CIFAR
ResNets' option-A shortcut used to yield a broken model. :class:`~compressor.models.layers.ChannelShortcut` is a fixed
0/1 channel map, i.e. a weightless strided 1x1 convolution, so its input and output channels can be pruned
independently, exactly like a convolution's:

* pruning output channel ``j`` deletes ``src[j]``;
* pruning input channel ``i`` turns every output that copied it into a zero channel and renumbers the rest.

Because output and input are decoupled, each stage's residual stream is its own pruning group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch_pruning as tp

from ..models.layers import ChannelShortcut


class ChannelShortcutPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning handler for :class:`ChannelShortcut` (no intra-layer dependency)."""

    TARGET_MODULES = (ChannelShortcut,)

    def prune_out_channels(self, layer: ChannelShortcut, idxs: Sequence[int]) -> ChannelShortcut:
        drop = set(int(i) for i in idxs)
        layer.src = [s for j, s in enumerate(layer.src) if j not in drop]
        return layer

    def prune_in_channels(self, layer: ChannelShortcut, idxs: Sequence[int]) -> ChannelShortcut:
        drop = set(int(i) for i in idxs)
        kept = [i for i in range(layer.in_channels) if i not in drop]
        renumber = {old: new for new, old in enumerate(kept)}
        layer.src = [renumber.get(s, -1) if s >= 0 else -1 for s in layer.src]
        layer.in_channels = len(kept)
        return layer

    def get_out_channels(self, layer: ChannelShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelShortcut) -> int:
        return layer.in_channels


def customized_pruners() -> dict[type, tp.pruner.function.BasePruningFunc]:
    """The custom handlers to pass to ``DependencyGraph.build_dependency(customized_pruners=...)``."""
    return {ChannelShortcut: ChannelShortcutPruner()}
