"""Data-free pruning baselines: ``l1`` (filter L1 norm) and ``random`` (the floor every method must beat)."""

from __future__ import annotations

import torch
import torch_pruning as tp

from ..pruning.engine import full_tp_group
from .prune import PruneMethod, Scores, ScoringContext

_CONV_OUT = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels)


class L1(PruneMethod):
    """Filter L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

    For a group whose channels are the outputs of several convs (a residual stream), each conv's filter norms are
    divided by their mean, then averaged over the convs, so no single layer's scale dominates:
    :math:`s_c = \\frac{1}{|L_c|} \\sum_{l \\in L_c} \\|W_{l,c}\\|_1 / \\overline{\\|W_l\\|_1}`.
    """

    name = "l1"
    summary = "filter L1 norm (Li et al. 2017); data-free baseline"

    def score(self, ctx: ScoringContext) -> Scores:
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
        return Scores(scores)


class Random(PruneMethod):
    """Uniformly random channel scores, seeded: the floor every informed method must beat."""

    name = "random"
    summary = "random channels (seeded); sanity baseline"

    def score(self, ctx: ScoringContext) -> Scores:
        generator = torch.Generator().manual_seed(ctx.seed)
        return Scores({g.root: torch.rand(g.channels, generator=generator) for g in ctx.groups})
