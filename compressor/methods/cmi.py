"""``--method cmi``: filter pruning by conditional mutual information (issue 3; Vu-Van et al., arXiv:2411.18578).

For every pruning group the scorer

1. captures, on the calibration images, the maps the group's consumers actually read (the input of one consumer
   layer, so a residual stream is the map after the add and its coupled channels are one variable per channel),
   pools them to ``pool`` x ``pool`` (``--cmi-pool``) and builds one Gaussian Gram matrix per channel;
2. ranks the channels by greedy forward selection of ``I(Y; Z ∪ S ∪ c)`` and records the decreasing curve
   ``I(Y; rest | Z ∪ S)`` (:mod:`compressor.scoring.selection`), where ``Z`` is the conditioning set of
   ``condition``: nothing (``layer``), the kept channels of all groups processed before (``full``), or of the
   adjacent processed group(s) (``compact``);
3. cuts each ranking with ``cutoff``: ``target`` (keep counts allocated from all curves to meet ``--target``),
   ``scree`` (elbow of the curve) or ``permutation`` (stop when a newly added channel is not significant); or
   ``uniform``: only the rankings, the keep counts from the same uniform schedule as ``l1`` (to compare criteria at
   equal widths: issue 13's screening found ``target``'s own widths cost accuracy before fine-tuning).

Groups are processed in network order (the order in which their captured maps are computed), or, with
``direction="bidirectional"``, outward from the group with the highest pruning fraction in an unconditioned
first pass. With ``target`` and a conditioned formulation, the conditioning sets are sized by the keep counts
allocated from that unconditioned first pass; the final counts come from the conditioned curves. Only calibration
labels are used.

Departures from the paper, forced by the estimator (measurements in the docstrings and in issue 3's report):
the conditioning set of ``full``/``compact`` is the Hadamard product of its channels' Grams with the kernel widths
scaled by sqrt(set size) (:func:`~compressor.scoring.selection.geometric_joint`), because the plain product of a
whole layer's kept channels has entropy ``log2 N`` and makes every CMI zero; and the ranking past the sufficient
set (about a dozen channels already tell all calibration images apart) is by each channel's own relevance
``I(Y; c | Z)``, with duplicated channels last (:func:`~compressor.scoring.selection.greedy_select`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, PruningError
from ..options import option
from ..pruning import budget, engine
from ..pruning.budget import floor_keep
from ..pruning.engine import PruningGroup, full_tp_group
from ..scoring import selection as sel
from ..scoring.mutual_info import check_saturation, gram_matrix, label_gram
from .hooks import recording
from .prune import PruneMethod, Scores, ScoringContext

__all__ = ["CMI", "CMIOptions", "Tap", "allocate", "capture", "find_taps"]

CONDITIONS = ("layer", "full", "compact")
CUTOFFS = ("target", "scree", "permutation", "uniform")
DIRECTIONS = ("forward", "bidirectional")
WIDTH_RULES = ("median", "silverman")
PERMUTATIONS = 100
LEVEL = 0.05
#: The bisection on the shared ``t`` stops when the removed fraction is this close to the target.
T_STOP = 1e-3


@dataclass(frozen=True)
class CMIOptions:
    """Options of ``--method cmi`` (flags ``--cmi-*``; defaults measured, issue 3). The per-group floor and the
    channel alignment are the run's ``--min-keep`` and ``--round-to``."""

    alpha: float = option(2.0, help="Renyi entropy order; 2 uses the Frobenius shortcut (34x faster than 1.01 on "
                                    "ResNet-56)", example="1.01", low=0.0, low_open=True)
    condition: str = option("layer", help="conditioning set: layer (none), full (kept channels of all earlier "
                                          "layers), compact (the adjacent earlier layer)", example="compact",
                            choices=CONDITIONS)
    cutoff: str = option("target", help="where to cut each layer's ranking: target (meet --target), scree (elbow), "
                                        "permutation (test), uniform (the rankings only; every layer shrinks at the "
                                        "same pace, as for l1)", example="uniform", choices=CUTOFFS)
    direction: str = option("forward", help="forward (first layer to last) or bidirectional (outward from the most "
                                            "pruned layer)", example="bidirectional", choices=DIRECTIONS)
    kernel_width: float | str = option("median", help="Gaussian kernel width: median (per variable), silverman, or "
                                                      "a number > 0", example="2.5", choices=WIDTH_RULES, low=0.0,
                                       low_open=True)
    pool: int = option(4, help="average-pool maps to this size before the kernel (0 = no pooling)", example="2",
                       low=0)


# --------------------------------------------------------------------------------------------------- capture


@dataclass(frozen=True)
class Tap:
    """Where a group's channel variables are read: the input (or, as a fallback, output) of layer ``module``.

    ``idxs[c]`` is the channel of that tensor holding the group's channel ``c``.
    """

    root: str
    module: str
    idxs: tuple[int, ...]
    output: bool = False


def find_taps(model: nn.Module, graph: Any, groups: Sequence[PruningGroup]) -> dict[str, list[Tap]]:
    """Candidate taps of every group: Conv/Linear consumers whose input channels cover all of the group's channels.

    The index mapping is torch-pruning's: for an in-channel item, ``item.idxs`` are the consumer's input channels
    and ``item.root_idxs`` the group's channels (a concat offsets them). A group with no such consumer is read at
    its root layer's output (pre-activation; never the case for the built-in architectures).
    """
    names = {m: n for n, m in model.named_modules()}
    taps: dict[str, list[Tap]] = {}
    for group in groups:
        found = []
        for item in full_tp_group(model, graph, group):
            module = item.dep.target.module
            if graph.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            pairs = sorted((int(r), int(i)) for r, i in zip(item.root_idxs, item.idxs))
            if [r for r, _ in pairs] == list(range(group.channels)) and module in names:
                found.append(Tap(group.root, names[module], tuple(i for _, i in pairs)))
        taps[group.root] = found or [Tap(group.root, group.root, tuple(range(group.channels)), output=True)]
    return taps


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C, size*size)`` by adaptive average pooling (never upsampling); ``(B, C) -> (B, C, 1)``."""
    if x.ndim == 4 and size > 0:
        x = F.adaptive_avg_pool2d(x, (min(size, x.shape[-2]), min(size, x.shape[-1])))
    return x.flatten(2) if x.ndim >= 3 else x.reshape(x.shape[0], x.shape[1], 1)


def _recorder(store: dict, fired: dict, pool: int, linear: set[str]
              ) -> Callable[[tuple[str, bool], torch.Tensor], None]:
    """Keep each point's pooled maps (on the CPU) in ``store`` and the order in which the points first fired.

    A ``Linear`` layer's features are its *last* dimension; on a channels-last map ``(N, H, W, C)`` (ConvNeXt's
    pointwise layers) they are moved to dimension 1 first, so every point is read as ``(N, C, ...)``."""
    def record(key: tuple[str, bool], x: torch.Tensor) -> None:
        fired.setdefault(key, len(fired))
        if key[0] in linear and x.ndim > 2:
            x = x.movedim(-1, 1)
        store.setdefault(key, []).append(_pool(x, pool).cpu())
    return record


def capture(model: nn.Module, taps: Mapping[str, Sequence[Tap]], calib: Any, *, pool: int
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[Tap]]:
    """Run ``calib`` once through ``model`` and return each group's pooled channel maps ``(C, N, D)``, the labels
    ``(N,)``, and the tap used per group in network order.

    Among a group's candidate taps the one read *last* in the forward pass is used: for a residual stream, the map
    after the final add, which every block of the stream has written to.
    """
    points = sorted({(t.module, t.output) for cands in taps.values() for t in cands})
    store: dict = {}
    fired: dict = {}
    labels, batches = [], 0
    device = next(model.parameters()).device
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    with recording(model, points, _recorder(store, fired, pool, linear)), torch.no_grad():
        for x, y in calib:
            model(x.to(device))
            labels.append(torch.as_tensor(y).reshape(-1))
            batches += 1
    if not batches:
        raise InputError("--method cmi got no calibration batches; pass --data with images (--calib-samples > 0)")
    for key, chunks in store.items():
        if len(chunks) != batches:
            raise PruningError(f"layer {key[0]!r} runs {len(chunks) // batches}x per forward pass, so cmi cannot "
                               f"tell which call's input is the channel variable; exclude it with --ignore-layer")
    chosen = [max(cands, key=lambda t: fired.get((t.module, t.output), -1)) for cands in taps.values()]
    silent = [t for t in chosen if (t.module, t.output) not in store]
    if silent:
        raise PruningError(f"layer {silent[0].module!r} never runs in the forward pass, so cmi cannot read the "
                           f"channels of group {silent[0].root!r}; exclude it with --ignore-layer {silent[0].root}")
    chosen.sort(key=lambda t: fired.get((t.module, t.output), -1))
    feats = {}
    for tap in chosen:
        maps = torch.cat(store[(tap.module, tap.output)])
        feats[tap.root] = maps[:, list(tap.idxs)].transpose(0, 1).contiguous()
    return feats, torch.cat(labels), chosen


# ------------------------------------------------------------------------------------------------- selection


@dataclass
class _Layer:
    """Per-group state of one pass: the ranking, its curve and the keep count used for conditioning."""

    selection: sel.Selection
    keep: int | None = None
    pvalues: list[float] | None = None


class _Grams:
    """Channel Gram matrices built from the captured maps, with the kernel widths used (float64)."""

    def __init__(self, feats: Mapping[str, torch.Tensor], opts: CMIOptions, device: torch.device) -> None:
        self.feats, self.opts, self.device = feats, opts, device
        self.sigmas: dict[str, torch.Tensor] = {}
        self.saturated: dict[str, int] = {}

    def __call__(self, root: str) -> torch.Tensor:
        x = self.feats[root].to(self.device, torch.float64)
        width = self.opts.kernel_width
        # A rule's widths come from the distances the kernel needs anyway (one pass over the channels, a chunk at
        # a time: see gram_matrix), as kernel_width(x, rule=width) would give them.
        sigma_in: Any = width if isinstance(width, str) else torch.full(x.shape[:1], float(width), dtype=x.dtype,
                                                                        device=x.device)
        grams, sigma = gram_matrix(x, sigma=sigma_in, return_sigma=True)
        if root not in self.sigmas:  # once per group, however many passes
            self.sigmas[root] = sigma.cpu()
            self.saturated[root] = int(check_saturation(grams, sigma=sigma, what=f"layer {root}").sum())
        return grams


def _neighbours(index: int, done: Mapping[int, Any], condition: str) -> list[int]:
    if condition == "full":
        return sorted(done)
    if condition == "compact":
        return [j for j in (index - 1, index + 1) if j in done]
    return []


def _run_pass(roots: Sequence[str], sequence: Sequence[int], grams: _Grams, a_y: torch.Tensor, opts: CMIOptions,
              *, condition: str, keep_for: Mapping[str, int] | None, floors: Mapping[str, int], round_to: int,
              generator: torch.Generator) -> dict[str, _Layer]:
    """Select every group, visiting ``roots[i]`` for ``i`` in ``sequence``; conditioning sets are the kept channels
    of the already-visited groups chosen by ``condition`` (their counts from ``keep_for`` or from the cutoff, which
    is raised to the floor and rounded up to ``round_to``)."""
    done: dict[int, tuple[torch.Tensor, int]] = {}
    out: dict[str, _Layer] = {}
    for i in sequence:
        root = roots[i]
        g = grams(root)
        parts = [done[j] for j in _neighbours(i, done, condition)]
        base = None
        if parts:
            log_sum = parts[0][0]
            for p in parts[1:]:
                log_sum = log_sum + p[0]
            base = sel.geometric_joint(log_sum, sum(p[1] for p in parts))
        chosen = sel.greedy_select(g, a_y, base=base, alpha=opts.alpha)
        layer = _Layer(chosen)
        if opts.cutoff == "scree":
            layer.keep = max(sel.scree_cutoff(chosen.remaining), floors[root])
        elif opts.cutoff == "permutation":
            k, layer.pvalues = sel.permutation_cutoff(g, a_y, chosen.order, base=base, alpha=opts.alpha,
                                                      permutations=PERMUTATIONS, level=LEVEL, generator=generator)
            layer.keep = max(k, floors[root])
        if layer.keep is not None:
            layer.keep = min(g.shape[0], budget.round_up(layer.keep, round_to))
        kept = layer.keep if keep_for is None else keep_for[root]
        if condition != "layer" and kept:
            done[i] = (sel.log_kernels(g[chosen.order[:kept]]).sum(0), int(kept))
        elif condition != "layer":
            done[i] = (torch.zeros_like(g[0]), 0)
        out[root] = layer
    return out


def _scores(layers: Mapping[str, _Layer]) -> dict[str, torch.Tensor]:
    """Scores for the engine: ``C - rank`` (higher = selected earlier = kept first)."""
    out = {}
    for root, layer in layers.items():
        order = layer.selection.order
        score = torch.empty(order.numel())
        score[order] = torch.arange(order.numel(), 0, -1, dtype=torch.float32)
        out[root] = score
    return out


# ------------------------------------------------------------------------------------------------ allocation


def allocate(ctx: ScoringContext, layers: Mapping[str, _Layer]) -> budget.Allocation:
    """Find the shared ``t`` whose per-group keep counts (:func:`~selection.keep_at`) remove ``ctx.target`` of
    ``ctx.metric`` within ±``budget.TARGET_TOLERANCE``: bisection on ``t`` (the removed fraction falls as ``t``
    grows) under the policy of :mod:`compressor.pruning.budget` (floors from ``ctx.min_keep``; alignment
    ``ctx.round_to``, halved while too coarse, each finer search capped by the coarser counts under the target).
    """
    groups = ctx.groups
    meter = engine.meter(ctx.model, ctx.example_input, groups, _scores(layers), metric=ctx.metric)

    def keeps(t: float, align: int, cap: Mapping[str, int] | None) -> dict[str, int]:
        out = {}
        for g in groups:
            chosen = layers[g.root].selection
            floor = floor_keep(g.channels, min_keep=ctx.min_keep, round_to=align)
            k = sel.keep_at(t, chosen.remaining, chosen.sufficient, floor=floor, round_to=align)
            out[g.root] = min(k, cap[g.root]) if cap is not None else k
        return out

    def search_at(align: int, cap: Mapping[str, int] | None) -> list[budget.Trial]:
        return budget.bisect(lambda t: meter.trial(keeps(t, align, cap), t=t), ctx.target, 0.0, 2.0,
                             iterations=40, stop=T_STOP)

    return budget.meet_target(groups, search_at, meter, target=ctx.target, metric=ctx.metric,
                              round_to=ctx.round_to, min_keep=ctx.min_keep)


# ----------------------------------------------------------------------------------------------------- scorer


@dataclass(frozen=True)
class _Plan:
    layers: dict[str, _Layer]
    keep: dict[str, int]
    sequence: list[int]
    start: int | None
    passes: int
    allocation: budget.Allocation | None
    allocate_seconds: float


def _select(ctx: ScoringContext, roots: list[str], grams: _Grams, a_y: torch.Tensor, opts: CMIOptions,
            floors: Mapping[str, int]) -> _Plan:
    """One unconditioned pass where needed (``layer``; ``target`` counts and the bidirectional start for the
    conditioned pass), then the conditioned pass; final keep counts from the cutoff or the allocation."""
    generator = torch.Generator().manual_seed(ctx.seed)

    def run(sequence: Sequence[int], condition: str, keep_for: Mapping[str, int] | None) -> dict[str, _Layer]:
        return _run_pass(roots, sequence, grams, a_y, opts, condition=condition, keep_for=keep_for, floors=floors,
                         round_to=ctx.round_to, generator=generator)

    def counts(layers: dict[str, _Layer]) -> tuple[dict[str, int], budget.Allocation | None]:
        if opts.cutoff == "uniform":  # the engine's uniform schedule decides
            return {}, None
        if opts.cutoff != "target":
            return {r: int(layers[r].keep or 0) for r in roots}, None
        began = time.perf_counter()
        allocation = allocate(ctx, layers)
        spent.append(time.perf_counter() - began)
        return allocation.keep, allocation

    forward = list(range(len(roots)))
    spent: list[float] = []
    layers: dict[str, _Layer] = {}
    keep: dict[str, int] = {}
    allocation, passes = None, 0
    if opts.condition == "layer" or opts.cutoff == "target" or opts.direction == "bidirectional":
        layers = run(forward, "layer", None)
        keep, allocation = counts(layers)
        passes = 1
    sequence, start = forward, None
    if opts.direction == "bidirectional":
        channels = {r: int(layers[r].selection.order.numel()) for r in roots}
        start = max(forward, key=lambda i: ((channels[roots[i]] - keep[roots[i]]) / channels[roots[i]], -i))
        sequence = sel.outward(start, len(roots))
    if opts.condition != "layer":
        layers = run(sequence, opts.condition, keep if opts.cutoff == "target" else None)
        keep, allocation = counts(layers)
        passes = 2 if opts.cutoff == "target" or opts.direction == "bidirectional" else 1
    return _Plan(layers, keep, sequence, start, passes, allocation, sum(spent))


def _width_summary(grams: _Grams) -> dict[str, Any]:
    rule = grams.opts.kernel_width if isinstance(grams.opts.kernel_width, str) else "fixed"
    values = torch.cat([s.flatten() for s in grams.sigmas.values()]) if grams.sigmas else torch.zeros(1)
    q = torch.quantile(values.double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).tolist()
    return {"rule": rule, "min": round(q[0], 5), "median": round(q[1], 5), "max": round(q[2], 5)}


def _layer_info(tap: Tap, layer: _Layer, keep: int | None) -> dict[str, Any]:
    chosen = layer.selection
    shown = min(chosen.sufficient, 32) + 1
    info: dict[str, Any] = {
        "root": tap.root, "tap": tap.module + (" (output)" if tap.output else " (input)"),
        "channels": int(chosen.order.numel()), "keep": None if keep is None else int(keep),
        "sufficient": chosen.sufficient,
        "curve": [round(float(v), 4) for v in chosen.remaining[:shown]],
    }
    if layer.pvalues is not None:
        info["pvalues"] = [round(p, 3) for p in layer.pvalues]
    return info


class CMI(PruneMethod):
    """Conditional mutual information (matrix-based Rényi α-entropy), greedy per group (Vu-Van et al. 2024); see
    the module docstring. Options: :class:`CMIOptions`; the floors and alignment of ``scree``/``permutation``
    counts, and the budget of ``target``, come from the :class:`~compressor.methods.prune.ScoringContext`.
    """

    name = "cmi"
    summary = "conditional mutual information, greedy per layer (Vu-Van et al. 2024)"
    requires_data = True
    Options = CMIOptions

    def score(self, ctx: ScoringContext) -> Scores:
        opts: CMIOptions = self.options
        if ctx.calib is None:
            raise InputError("--method cmi needs calibration data; pass --data")
        start = time.perf_counter()
        feats, labels, taps = capture(ctx.model, find_taps(ctx.model, ctx.graph, ctx.groups), ctx.calib,
                                      pool=opts.pool)
        captured = time.perf_counter()
        roots = [t.root for t in taps]
        channels = {g.root: g.channels for g in ctx.groups}
        floors = {r: floor_keep(channels[r], min_keep=ctx.min_keep, round_to=ctx.round_to) for r in roots}
        grams = _Grams(feats, opts, ctx.device)
        a_y = label_gram(labels, ctx.num_classes, dtype=torch.float64).to(ctx.device)
        plan = _select(ctx, roots, grams, a_y, opts, floors)
        done = time.perf_counter()
        report = {
            "formulation": opts.condition, "cutoff": opts.cutoff, "direction": opts.direction,
            "alpha": opts.alpha, "pool": opts.pool, "kernel_width": _width_summary(grams),
            "samples": int(labels.numel()), "passes": plan.passes, "order": [roots[i] for i in plan.sequence],
            "start": roots[plan.start] if plan.start is not None else None,
            "saturated_channels": int(sum(grams.saturated.values())),
            "seconds": {"capture": round(captured - start, 3),
                        "select": round(done - captured - plan.allocate_seconds, 3),
                        "allocate": round(plan.allocate_seconds, 3), "total": round(done - start, 3)},
            "keep": {r: int(plan.keep[r]) for r in roots if r in plan.keep},
            "layers": [_layer_info(t, plan.layers[t.root], plan.keep.get(t.root)) for t in taps],
        }
        if plan.allocation is not None:
            report["allocation"] = plan.allocation.summary()
        return Scores(_scores(plan.layers), keep=dict(plan.keep) or None, report=report)
