"""``--method mipp``: mutual-information-preserving pruning (issue 4; Westphal, Hailes and Musolesi, arXiv:2411.00147).

Layer ``l`` keeps the channels that layer ``l+1`` needs, and layers are decided from the outputs back to the inputs,
so that each one keeps what the already pruned layer above it reads:

1. **Problems.** Every consumer ``M`` of a group (a conv or linear layer that reads the group's channels, ``X_l``)
   is one problem: predict ``X_{l+1}``, the map where ``M``'s output channels are read next (after ``M``'s BN,
   activation and any residual add), restricted to the channels kept in the group ``M`` writes. Where that group
   was read before ``M`` ran (the residual stream entering a block), that earlier map ``Z`` is given to the
   predictor as a condition that is never masked, so what is measured is what ``X_l`` adds to ``X_{l+1}`` beyond
   its own past: a transfer entropy, as in the transfer-entropy redundancy criterion (TERC) of the paper. An output
   layer's ``X_{l+1}`` is the softmax of the logits. A group's channels are decided once for all its consumers
   (a residual stream: every block's ``conv1`` and the next stage or the classifier), their losses summed.
2. **Order.** Groups are processed in the reverse of the order in which they are last read: the stream feeding the
   classifier first. In a residual stage the stream comes before its blocks' inner groups, whose ``X_{l+1}`` is
   the (pruned) stream; a target group not yet decided contributes all its channels.
3. **Within a group (TERC).** Score every channel alone (its own information about ``X_{l+1}`` given ``Z``),
   test from the least informative to the most: mask the candidate together with those already removed, re-fit,
   and remove it for good unless one is more than ``x`` confident that the loss rose above the reference (the fit
   on all channels). Candidates are tested in blocks that are bisected only when they fail; the block size adapts
   (doubles after a block that was removed whole, halves after one that was kept whole).
4. **Confidence and target.** ``x`` sets how aggressive pruning is. With ``mipp_confidence`` unset it is searched
   (on the equivalent t threshold, in log space) so that the keep counts remove ``--target`` of the metric within
   ±0.02; where no ``x`` can (the floors, or a step in the removed fraction), the ``x`` that removes the most without
   passing the target is kept and a per-group cap ``ceil(ρ C)`` is bisected on top, met by greedy backward
   elimination (smallest loss increase first). ``round_to`` alignment (best effort, as for the other methods) rounds
   each keep count to the nearest multiple inside the pass, by greedy elimination or by re-adding the last removed
   channels, so that the groups below predict what is really kept.

**Estimators** (``mipp_estimator``; maths in :mod:`compressor.scoring.predictor`):

* ``predictor`` (default): a linear predictor with the geometry of layer ``l+1`` (a ``k×k`` conv with its stride,
  padding and dilation, plus a bias) from ``[Z, X_l]`` to the post-nonlinearity ``X_{l+1}``, fitted by ridge least
  squares on ``mipp_repeats - 1`` folds of the calibration images and scored by the held-out fraction of variance
  unexplained on the last, at ``mipp_positions`` random positions per image. Why linear and not the conv followed
  by the layer's nonlinearity: a predictor that can represent layer ``l+1`` exactly (warm-started from its own
  weights) reaches zero loss, so every channel with a non-zero weight would raise the loss with certainty and the
  test would only ever remove dead and duplicated channels. Fitting the linear part of the post-nonlinearity map
  leaves the nonlinearity in the residual, and the held-out loss then has the resolution of a real estimator: a
  channel stays when its information outweighs the variance of estimating its ``k²`` weights from this many
  samples. The linear fit also makes every re-fit exact and cheap: masking a block of channels is a rank-``|J|``
  downdate of the fitted inverse (the "warm start"), so a test costs a ``|J|``-sized solve. Why not a pooled MLP:
  pooling before the fit discards the spatial pattern that a ``k×k`` consumer reads, and the MLP's re-fits are
  neither exact nor cheap. The ``K`` held-out differences give Nadeau and Bengio's corrected t statistic.
* ``renyi``: matrix-based Rényi ``I_2(X_S; X_{l+1} | Z)`` between the geometric joints of the channels' Gram
  matrices (maps average-pooled to ``mipp_pool``, as in ``--method cmi``); repeats are the ``K``
  delete-one-fold subsamples of the images, with the jackknife t statistic. Much faster, blind to spatial layout.

Cost: activations are captured once, in chunks of :data:`CHUNK` images, and reduced on the fly to per-fold Gram
matrices (or pooled maps); every search pass reuses them. Linear algebra runs in float64 on ``ctx.device``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, PruningError
from ..pruning import engine
from ..pruning.engine import PruningGroup, floor_keep, full_tp_group
from ..pruning.scorers import Scorer, ScoringContext, ScoringResult, register_scorer
from ..scoring import predictor as pr
from ..scoring.mutual_info import kernel_width, pairwise_sq_dists
from . import reject_unknown_options
from .cmi import Tap, find_taps

log = logging.getLogger("compressor")

ESTIMATORS = ("predictor", "renyi")
OPTION_KEYS = ("mipp_estimator", "mipp_confidence", "mipp_repeats", "mipp_positions", "mipp_block", "mipp_pool")
RUN_KEYS = ("min_keep", "round_to")
#: Ridge penalty relative to the mean diagonal of the design's Gram (numerical safety, not a prior).
RIDGE = 1e-3
#: Images per forward pass of the capture (bounds the memory of the hooked maps).
CHUNK = 32
#: Search range of the t threshold (x = F_{K-1}(t)): 0.01 is x = 0.5037; 1e4 removes all but the floors in practice.
#: The search starts at T_START (x = 0.9993 for 5 repeats), where trained CIFAR ResNets remove about a third.
T_MIN, T_START, T_MAX = 0.01, 8.0, 1e4
#: The search stops when the removed fraction is this close to the target, after PATIENCE passes when it is within the
#: pipeline's ±0.02, and after MAX_PASSES passes in any case.
SEARCH_TOL = 0.01
PATIENCE = 6
MAX_PASSES = 10


@dataclass(frozen=True)
class MIPPOptions:
    """Validated options of the ``mipp`` scorer (``method_options`` keys ``mipp_*``)."""

    estimator: str = "predictor"
    confidence: float | None = None
    repeats: int = 5
    positions: int = 16
    block: int = 8
    pool: int = 4
    min_keep: float = 0.1
    round_to: int = 1


def _integer(options: Mapping[str, Any], key: str, default: int, low: int, hint: str) -> int:
    value = options.get(key, default)
    flag = "--" + key.replace("_", "-")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{flag} must be an integer >= {low} ({hint}); got {value!r}") from None
    if isinstance(value, bool) or number != float(value) or number < low:
        raise InputError(f"{flag} must be an integer >= {low} ({hint}); got {value!r}")
    return number


def parse_options(options: Mapping[str, Any]) -> MIPPOptions:
    """Check ``options`` (``mipp_*`` keys plus ``min_keep``/``round_to``) and return them; InputError otherwise.

    A key whose value is ``None`` takes its default (a CLI flag that was not given).
    """
    options = {k: v for k, v in options.items() if v is not None}
    reject_unknown_options("mipp", set(options) - set(RUN_KEYS), OPTION_KEYS)
    estimator = options.get("mipp_estimator", "predictor")
    if estimator not in ESTIMATORS:
        raise InputError(f"--mipp-estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    confidence = options.get("mipp_confidence")
    if confidence is not None:
        try:
            confidence = float(confidence)
        except (TypeError, ValueError):
            confidence = math.nan
        if isinstance(options["mipp_confidence"], bool) or not 0.5 <= confidence < 1.0:
            raise InputError(f"--mipp-confidence must be a number in [0.5, 1), e.g. 0.95 (leave it unset to meet "
                             f"--target); got {options['mipp_confidence']!r}")
    return MIPPOptions(
        estimator=str(estimator), confidence=confidence,
        repeats=_integer(options, "mipp_repeats", 5, 3, "folds of the loss estimate, e.g. 5"),
        positions=_integer(options, "mipp_positions", 16, 1, "spatial positions sampled per image, e.g. 16"),
        block=_integer(options, "mipp_block", 8, 1, "channels tested together before bisecting, e.g. 8"),
        pool=_integer(options, "mipp_pool", 4, 1, "renyi: maps are pooled to this size, e.g. 4"),
        min_keep=float(options.get("min_keep", 0.1)), round_to=int(options.get("round_to", 1)),
    )


# ------------------------------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """One consumer ``M`` (``consumer``) of group ``root``: predict ``X_{l+1}`` from ``X_l``.

    ``x`` reads ``X_l`` (``M``'s input). ``M`` writes channels ``written`` of group ``target_root`` (``None``: ``M``'s
    outputs are no group, and its raw output, or the softmax of an output layer, is the target); ``X_{l+1}`` is read
    at hook point ``target`` with tensor channel ``target_idxs[i]`` for ``written[i]``, and the condition ``Z`` at
    ``cond`` (same channels) when that group was read before ``M`` ran.
    """

    root: str
    consumer: str
    x: Tap
    target_root: str | None
    written: tuple[int, ...]
    target: tuple[str, bool] = ("", False)
    target_idxs: tuple[int, ...] = ()
    cond: tuple[str, bool] | None = None
    cond_idxs: tuple[int, ...] = ()
    softmax: bool = False
    spatial: bool = True
    geometry: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Design columns per channel of ``X_l`` (``k²`` for a spatial conv problem, else 1)."""
        kernel = self.geometry.get("kernel_size", (1, 1))
        return int(kernel[0] * kernel[1]) if self.spatial else 1


def _writers(model: nn.Module, graph: Any, groups: Sequence[PruningGroup]) -> dict[str, tuple[str, tuple[int, ...],
                                                                                           tuple[int, ...]]]:
    """For each conv/linear layer whose output channels belong to a group: ``(group, group channels, layer
    output channels)`` (torch-pruning's ``root_idxs`` and ``idxs`` of the out-channel item)."""
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
    for group in groups:
        for item in full_tp_group(model, graph, group):
            module = item.dep.target.module
            if not graph.is_out_channel_pruning_fn(item.dep.handler) or module not in names:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)) and names[module] not in out:
                pairs = sorted((int(r), int(i)) for r, i in zip(item.root_idxs, item.idxs))
                out[names[module]] = (group.root, tuple(r for r, _ in pairs), tuple(i for _, i in pairs))
    return out


def find_problems(model: nn.Module, graph: Any, groups: Sequence[PruningGroup]) -> dict[str, list[Problem]]:
    """Every group's consumers (``find_taps`` of ``--method cmi``: conv/linear layers that read all its channels).

    The hook points of ``X_{l+1}`` and ``Z`` need the order of execution and are set by :func:`capture`.
    """
    modules = dict(model.named_modules())
    writers = _writers(model, graph, groups)
    problems: dict[str, list[Problem]] = {}
    for root, taps in find_taps(model, graph, groups).items():
        found = []
        for tap in taps:
            if tap.output:
                continue
            module = modules[tap.module]
            target_root, written, _ = writers.get(tap.module, (None, (), ()))
            if target_root is None:
                written = tuple(range(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features))
            geometry = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation")} \
                if isinstance(module, nn.Conv2d) else {}
            found.append(Problem(root, tap.module, tap, target_root, tuple(written), geometry=geometry))
        if not found:
            raise PruningError(f"no conv or linear layer reads all channels of group {root!r}, so mipp has no "
                               f"layer l+1 to preserve; exclude it with --ignore-layer {root}")
        problems[root] = found
    return problems


def _resolve(problems: Mapping[str, list[Problem]], order: Mapping[tuple[str, str], int],
             taps: Mapping[str, Sequence[Tap]], graph: Any, modules: Mapping[str, nn.Module],
             store: Mapping[tuple[str, str], list[torch.Tensor]]) -> None:
    """Set each problem's ``X_{l+1}`` (the first read of the written group after ``M`` ran, else ``M``'s output) and
    ``Z`` (the last read of that group before ``M`` ran), from the execution ``order`` of ``(module, "in"/"out")``.

    A first read by a linear layer of globally pooled maps is moved to the pooling layer's input (``store`` holds
    the first forward pass): the activation map of layer ``l+1`` itself, with 16 to 64 positions per image instead
    of one value, which is what gives the last block's test its power.
    """
    pools = [name for name, m in modules.items() if isinstance(m, _POOLS) and (name, "in") in store]
    for probs in problems.values():
        for p in probs:
            start, end = order[(p.consumer, "in")], order[(p.consumer, "out")]
            reads = [t for t in taps.get(p.target_root or "", []) if not t.output and (t.module, "in") in order]
            after = [t for t in reads if order[(t.module, "in")] > end]
            before = [t for t in reads if order[(t.module, "in")] < start]
            if after:
                nxt = min(after, key=lambda t: order[(t.module, "in")])
                p.target, p.target_idxs = (nxt.module, False), tuple(nxt.idxs[c] for c in p.written)
                read = store[(nxt.module, "in")][0]
                for pool in pools:
                    out = store[(pool, "out")][0]
                    if read.ndim == 2 and out.ndim == 4 and out.shape[2:] == (1, 1) and torch.equal(out.flatten(1),
                                                                                                     read):
                        p.target = (pool, False)
            else:  # the written channels of a layer in no group are its own output channels
                p.target, p.target_idxs = (p.consumer, True), p.written
                node = graph.module2node[modules[p.consumer]]
                p.softmax = p.target_root is None and not engine._reaches_prunable(node)
            if before and p.target_root != p.root:
                prev = max(before, key=lambda t: order[(t.module, "in")])
                p.cond, p.cond_idxs = (prev.module, False), tuple(prev.idxs[c] for c in p.written)


# -------------------------------------------------------------------------------------------------- capture

_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


@contextmanager
def _recording(model: nn.Module, names: Sequence[str], store: dict, order: dict) -> Iterator[None]:
    """Keep the input and output of every module in ``names`` per forward call in ``store`` and the order of the
    calls in ``order``; hooks are removed and the train/eval mode restored in ``finally``."""
    modules = dict(model.named_modules())
    handles, was_training = [], model.training

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            order.setdefault((name, "in"), len(order))
            store[(name, "in")] = store.get((name, "in"), []) + [args[0].detach()]
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            order.setdefault((name, "out"), len(order))
            store[(name, "out")] = store.get((name, "out"), []) + [output.detach()]
        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(pre(name)))
            handles.append(modules[name].register_forward_hook(post(name)))
        model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _channels(x: torch.Tensor, idxs: Sequence[int]) -> torch.Tensor:
    return x[:, list(idxs)]


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1) if x.ndim > 2 else x


def _target_values(p: Problem, t: torch.Tensor) -> torch.Tensor:
    t = _channels(t, p.target_idxs)
    return torch.softmax(t, dim=1) if p.softmax else t


@dataclass
class Moments:
    """What the estimators read, accumulated over the calibration images.

    ``grams[(root, i)]``: per-fold Gram matrices ``(K, M, M)`` of problem ``i``'s rows ``[1, z, x, y]`` (predictor);
    ``pooled[(root, i)]``: ``(x, y, z)`` maps pooled per image, ``(C, N, d)`` each (renyi); ``folds``: fold per image.
    """

    grams: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    pooled: dict[tuple[str, int], list[list[torch.Tensor]]] = field(default_factory=dict)
    folds: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def nbytes(self) -> int:
        tensors = [*self.grams.values(), *(t for chunks in self.pooled.values() for maps in chunks for t in maps)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _rows(p: Problem, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, positions: int,
          generator: torch.Generator) -> torch.Tensor:
    """Design rows ``[1, z, x, y]`` ``(B, P, M)``: ``P`` random positions of ``M``'s output grid per image (spatial),
    or one row per image with every map averaged over space."""
    b = x.shape[0]
    if p.spatial:
        g = p.geometry
        patches = F.unfold(x, g["kernel_size"], dilation=g["dilation"], padding=g["padding"], stride=g["stride"])
        n_pos = patches.shape[-1]
        count = min(positions, n_pos)
        pos = torch.stack([torch.randperm(n_pos, generator=generator)[:count] for _ in range(b)]).to(x.device)

        def at(t: torch.Tensor) -> torch.Tensor:
            flat = t.flatten(2)
            return torch.gather(flat, 2, pos[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)

        parts = [at(patches), at(y)]
        if z is not None:
            parts.insert(0, at(z))
    else:
        parts = [_pooled(x)[:, None], _pooled(y)[:, None]]
        if z is not None:
            parts.insert(0, _pooled(z)[:, None])
    ones = torch.ones((*parts[0].shape[:2], 1), dtype=parts[0].dtype, device=parts[0].device)
    return torch.cat([ones, *parts], dim=-1).float()


def _spatial(p: Problem, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None) -> bool:
    """A conv consumer whose output grid is the grid of ``X_{l+1}`` (and of ``Z``) gets per-position rows."""
    if not p.geometry or isinstance(p.geometry["padding"], str) or x.ndim != 4 or y.ndim != 4:
        return False
    g = p.geometry
    grid = [(x.shape[2 + d] + 2 * g["padding"][d] - g["dilation"][d] * (g["kernel_size"][d] - 1) - 1)
            // g["stride"][d] + 1 for d in range(2)]
    return list(y.shape[2:]) == grid and (z is None or (z.ndim == 4 and list(z.shape[2:]) == grid))


def _pool_maps(t: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (C, B, d)`` adaptive-average-pooled to at most ``size`` x ``size``; ``(B, C) -> (C, B, 1)``."""
    if t.ndim == 4:
        t = F.adaptive_avg_pool2d(t, (min(size, t.shape[2]), min(size, t.shape[3])))
    return t.flatten(2).permute(1, 0, 2) if t.ndim >= 3 else t.T[:, :, None]


def capture(model: nn.Module, problems: Mapping[str, list[Problem]], taps: Mapping[str, Sequence[Tap]],
            graph: Any, calib: Any, opts: MIPPOptions, *, seed: int) -> tuple[Moments, dict[tuple[str, str], int]]:
    """Run ``calib`` once (in chunks of :data:`CHUNK` images) and reduce every problem to what its estimator reads;
    also return the execution order of the consumers' ``(name, "in"/"out")`` calls.

    The first chunk fixes each problem's ``X_{l+1}`` and ``Z`` (:func:`_resolve`). Images are assigned to
    ``opts.repeats`` balanced folds at random (seeded); positions are drawn per image and problem from the same
    generator, so the same seed and data give the same moments.
    """
    modules = dict(model.named_modules())
    consumers = sorted({p.consumer for probs in problems.values() for p in probs})
    names = consumers + sorted(n for n, m in modules.items() if isinstance(m, _POOLS))
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    moments, order, folds, seen = Moments(), {}, [], 0
    k = opts.repeats
    with torch.no_grad():
        for batch in calib:
            for x in batch[0].split(CHUNK):
                store: dict = {}
                with _recording(model, names, store, order):
                    model(x.to(device))
                if not folds:
                    _check_calls(store, consumers)
                    _resolve(problems, order, taps, graph, modules, store)
                fold = (torch.arange(seen, seen + x.shape[0]) % k)[torch.randperm(x.shape[0], generator=generator)]
                folds.append(fold)
                seen += x.shape[0]
                for root, probs in problems.items():
                    for i, p in enumerate(probs):
                        _accumulate(moments, (root, i), p, store, fold, opts, generator)
    if not seen:
        raise InputError("--method mipp got no calibration batches; pass --data with images (--calib-samples > 0)")
    if seen < 2 * k:
        raise InputError(f"--method mipp needs at least {2 * k} calibration images for {k} folds; got {seen}: "
                         f"raise --calib-samples or lower --mipp-repeats")
    moments.folds = torch.cat(folds)
    return moments, order


def _check_calls(store: Mapping[tuple[str, str], list], names: Sequence[str]) -> None:
    for name in names:
        calls = len(store.get((name, "in"), []))
        if calls != 1:
            what = "never runs" if calls == 0 else f"runs {calls}x"
            raise PruningError(f"layer {name!r} {what} per forward pass, so mipp cannot tell which call reads the "
                               f"channels; exclude its group with --ignore-layer")


def _accumulate(moments: Moments, key: tuple[str, int], p: Problem, store: Mapping, fold: torch.Tensor,
                opts: MIPPOptions, generator: torch.Generator) -> None:
    x = _channels(store[(p.x.module, "in")][0], p.x.idxs)
    y = _target_values(p, store[(p.target[0], "out" if p.target[1] else "in")][0])
    z = _channels(store[(p.cond[0], "in")][0], p.cond_idxs) if p.cond is not None else None
    if opts.estimator == "renyi":
        maps = [_pool_maps(t.float().cpu(), opts.pool) for t in (x, y, z) if t is not None]
        moments.pooled.setdefault(key, []).append(maps)
        return
    if key not in moments.grams:
        p.spatial = _spatial(p, x, y, z)
    rows = _rows(p, x, y, z, opts.positions, generator)
    fold = fold.to(rows.device)
    width = rows.shape[-1]
    grams = moments.grams.get(key)
    if grams is None:
        grams = moments.grams[key] = torch.zeros(opts.repeats, width, width)
    for f in range(opts.repeats):
        part = rows[fold == f].reshape(-1, width)
        grams[f] += (part.T @ part).cpu()


# ------------------------------------------------------------------------------------------------ estimators


class _Layer:
    """The measure of one group during one pass: per problem (consumer) the reference, and the loss increase of
    masking ``removed ∪ J``, as ``K`` paired values; per channel its information alone.

    A group's channels are decided once for all its consumers, and a channel is needed when any consumer needs it,
    so the test statistic of a set is the largest of its per-consumer t statistics (:meth:`t`): pooling the
    consumers' losses instead would let one noisy consumer (the classifier's 256 image-level rows) drown the
    evidence of the precise ones.
    """

    channels: int
    tests: int = 0

    def reference(self) -> torch.Tensor:  # (P, K) per problem
        raise NotImplementedError

    def solo(self) -> torch.Tensor:  # (C,) information of each channel alone, higher = more
        raise NotImplementedError

    def delta(self, sets: torch.Tensor) -> torch.Tensor:  # (B, j) channel sets -> (B, P, K) loss increase
        raise NotImplementedError

    def remove(self, channels: Sequence[int]) -> None:
        raise NotImplementedError

    def t(self, deltas: torch.Tensor) -> torch.Tensor:  # (B, P, K) -> (B,) the largest per-problem t
        raise NotImplementedError


class _PredictorLayer(_Layer):
    """Cross-fitted ridge predictors of all problems of one group (see :mod:`compressor.scoring.predictor`)."""

    def __init__(self, probs: Sequence[Problem], grams: Sequence[torch.Tensor], kept: Mapping[str, torch.Tensor],
                 channels: int, device: torch.device) -> None:
        self.channels = channels
        self.fits: list[pr.RidgeFit] = []
        self.cols: list[torch.Tensor] = []
        self.solos: list[torch.Tensor] = []
        for p, g in zip(probs, grams):
            g = g.to(device, torch.float64)
            written = torch.as_tensor(p.written)
            keep_t = _kept_positions(written, kept.get(p.target_root or "", None))
            n_cond = len(p.written) if p.cond is not None else 0
            x0 = 1 + n_cond
            width = p.width
            y0 = x0 + channels * width
            base = torch.cat((torch.zeros(1, dtype=torch.long), 1 + keep_t if n_cond else keep_t[:0]))
            target = y0 + keep_t
            design = torch.cat((base, torch.arange(x0, y0)))
            channel_cols = torch.arange(x0, y0).reshape(channels, width)
            base_loss, solo = pr.solo_losses(g, base.to(device), channel_cols.to(device), target.to(device),
                                             ridge=RIDGE)
            self.solos.append((base_loss[None, :] - solo).mean(-1).cpu())
            self.fits.append(pr.fit_ridge(g, design.to(device), target.to(device), ridge=RIDGE))
            # columns of channel c within the design (positions, for the fitted matrices)
            self.cols.append((len(base) + torch.arange(channels * width).reshape(channels, width)).to(device))
        self.ref = torch.stack([f.loss for f in self.fits])

    def reference(self) -> torch.Tensor:
        return self.ref

    def solo(self) -> torch.Tensor:
        return torch.stack(self.solos).sum(0)

    def delta(self, sets: torch.Tensor) -> torch.Tensor:
        self.tests += sets.shape[0]
        losses = [pr.removal_loss(fit, cols[sets.to(cols.device)].flatten(1)) for fit, cols in zip(self.fits, self.cols)]
        return torch.stack(losses, dim=1) - self.ref

    def remove(self, channels: Sequence[int]) -> None:
        for i, (fit, cols) in enumerate(zip(self.fits, self.cols)):
            self.fits[i] = pr.remove(fit, cols[list(channels)].flatten())

    def t(self, deltas: torch.Tensor) -> torch.Tensor:
        return pr.corrected_t(deltas, scale=self.ref.abs().mean(-1)).amax(dim=1)


def _kept_positions(written: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """Positions in ``written`` (a layer's channels of the target group) of the channels that group keeps."""
    if kept is None:
        return torch.arange(written.numel())
    return torch.nonzero(torch.isin(written, kept.cpu())).flatten()


class _RenyiLayer(_Layer):
    """Matrix-based Rényi ``I_2(X_S; X_{l+1} | Z)`` summed over the group's problems, on the ``K`` delete-one-fold
    subsamples of the images (jackknife); see :func:`~compressor.scoring.predictor.renyi_weights`.

    The set ``S`` is the Hadamard product of its channels' Gaussian kernels, each at its median-rule width times
    ``√C`` (``C`` the group's channels): for all channels that is the geometric joint of ``--method cmi``, which does
    not saturate; masking a channel drops its factor, so the joint entropy can only fall (Yu et al. 2020) and the
    reference is the most informative set, as the test requires. (Re-scaling the widths to the size of the remaining
    set instead makes the measure non-monotone: removing channels sharpens the kernel and can raise it.)
    """

    def __init__(self, probs: Sequence[Problem], maps: Sequence[list[list[torch.Tensor]]], folds: torch.Tensor,
                 kept: Mapping[str, torch.Tensor], channels: int, widths: dict, device: torch.device) -> None:
        self.channels = channels
        inside = torch.stack([folds != f for f in range(int(folds.max()) + 1)]).to(device, torch.float64)
        self.logk: list[torch.Tensor] = []
        self.sums: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        solos = []
        for i, (p, chunks) in enumerate(zip(probs, maps)):
            parts = [torch.cat(t, dim=1).to(device, torch.float64) for t in zip(*chunks)]
            keep_t = _kept_positions(torch.as_tensor(p.written), kept.get(p.target_root or "", None)).to(device)
            sigma = [_widths(t, widths, (p.root, i, kind)) for t, kind in zip(parts, "xyz")]
            logk = -pairwise_sq_dists(parts[0] / sigma[0][:, None, None]) / (2 * channels)
            log_y = _set_log_kernel(parts[1][keep_t], sigma[1][keep_t])
            log_z = _set_log_kernel(parts[2][keep_t], sigma[2][keep_t]) if len(parts) > 2 else None
            self.weights.append(pr.renyi_weights(log_y, log_z, inside))
            self.logk.append(logk)
            self.sums.append(logk.sum(0))
            solos.append(pr.renyi_information(2 * logk, self.weights[-1]).mean(-1))
        self.solo_info = torch.stack(solos).sum(0).cpu()
        self.ref_info = self._info(None)

    def _info(self, sets: torch.Tensor | None) -> torch.Tensor:
        """``(B, P, K)`` information (up to a constant per fold) of the present channels without each set ``J``."""
        out = []
        for logk, total, weights in zip(self.logk, self.sums, self.weights):
            joint = total[None] if sets is None else total[None] - logk[sets.to(logk.device)].sum(1)
            out.append(pr.renyi_information(2 * joint, weights))
        return torch.stack(out, dim=1)

    def reference(self) -> torch.Tensor:
        return self.ref_info[0]

    def solo(self) -> torch.Tensor:
        return self.solo_info

    def delta(self, sets: torch.Tensor) -> torch.Tensor:
        self.tests += sets.shape[0]
        return self.ref_info - self._info(sets)

    def remove(self, channels: Sequence[int]) -> None:
        idx = list(channels)
        for i, logk in enumerate(self.logk):
            self.sums[i] = self.sums[i] - logk[idx].sum(0)

    def t(self, deltas: torch.Tensor) -> torch.Tensor:
        return pr.jackknife_t(deltas, scale=self.ref_info[0].abs().mean(-1)).amax(dim=1)


def _widths(feats: torch.Tensor, widths: dict, key: tuple) -> torch.Tensor:
    """Median-rule kernel width of each channel of pooled maps ``(C, N, d)``, computed once per problem."""
    if key not in widths:
        widths[key] = kernel_width(feats, rule="median")
    return widths[key].to(feats)


def _set_log_kernel(feats: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``log`` of the geometric joint of channels ``(T, N, d)``: ``-Σ_c ||x_ci - x_cj||² / (2σ_c² T)``, from one
    pairwise-distance product on the width-scaled maps laid side by side."""
    scaled = (feats / sigma[:, None, None]).permute(1, 0, 2).flatten(1)
    return -pairwise_sq_dists(scaled) / (2 * max(feats.shape[0], 1))


# ------------------------------------------------------------------------------------------------- one pass


@dataclass
class _Decision:
    """One group's outcome in one pass: the keep count, how it was reached, the work done."""

    keep: int
    by_test: int
    by_cap: int
    tests: int
    reference: list[float]
    seconds: float


def _terc(layer: _Layer, t_star: float, room: int, block: int) -> list[int]:
    """Transfer-entropy redundancy criterion: candidates from least to most informative alone; a block is removed
    for good when the test is not confident (``t <= t_star``) that masking it with those already removed raises the
    loss; a failing block is bisected. At most ``room`` channels are removed."""
    candidates = torch.argsort(layer.solo(), stable=True).tolist()
    removed: list[int] = []

    def test(chunk: list[int]) -> int:
        chunk = chunk[: room - len(removed)]
        if not chunk:
            return 0
        sets = torch.as_tensor([chunk])  # those already removed are masked in the layer's state
        t = float(layer.t(layer.delta(sets))[0])
        if t <= t_star:
            layer.remove(chunk)
            removed.extend(chunk)
            return len(chunk)
        if len(chunk) == 1:
            return 0
        half = len(chunk) // 2
        return test(chunk[:half]) + test(chunk[half:])

    i, size = 0, block
    while i < len(candidates) and len(removed) < room:
        chunk = candidates[i: i + size]
        gone = test(chunk)
        size = min(2 * size, 64) if gone == len(chunk) else max(1, size // 2) if gone == 0 else size
        i += len(chunk)
    return removed


def _eliminate(layer: _Layer, alive: list[int], count: int) -> list[int]:
    """Greedy backward elimination of ``count`` channels: each step removes the one whose masking is least
    significant (smallest t statistic)."""
    out = []
    for _ in range(count):
        stats = layer.t(layer.delta(torch.as_tensor(alive)[:, None]))
        best = alive[int(torch.argmin(stats))]
        layer.remove([best])
        alive.remove(best)
        out.append(best)
    return out


@dataclass
class _Pass:
    keep: dict[str, int]
    scores: dict[str, torch.Tensor]
    decisions: dict[str, _Decision]
    achieved: float = math.nan


def _run_pass(plan: _Plan, t_star: float, cap: float, round_to: int) -> _Pass:
    """Decide every group from the outputs back: TERC at ``t_star``, then the cap ``ceil(cap · C)``, floors and
    alignment; the kept channels of each group become the targets of the groups below."""
    kept: dict[str, torch.Tensor] = {}
    keep, scores, decisions = {}, {}, {}
    for root in plan.order:
        began = time.perf_counter()
        c = plan.channels[root]
        floor = floor_keep(c, min_keep=plan.opts.min_keep, round_to=1)
        layer = plan.layer(root, kept)
        ranked = torch.argsort(layer.solo(), stable=True).tolist()
        removed = _terc(layer, t_star, c - floor, plan.opts.block)
        by_test = len(removed)
        n_keep = max(floor, min(c - by_test, math.ceil(cap * c - 1e-9)))
        if round_to > 1:  # to the nearest multiple, at least the aligned floor
            aligned = min(c, math.floor(n_keep / round_to + 0.5) * round_to)
            n_keep = max(aligned, floor_keep(c, min_keep=plan.opts.min_keep, round_to=round_to))
        if n_keep > c - by_test:  # re-add the last removed
            removed = removed[: c - n_keep]
        alive = [ch for ch in ranked if ch not in set(removed)]
        removed += _eliminate(layer, alive, len(alive) - n_keep)
        gone = set(removed)
        order = removed + [ch for ch in ranked if ch not in gone]
        score = torch.empty(c)
        score[torch.as_tensor(order)] = torch.arange(1, c + 1, dtype=torch.float32)
        kept[root] = torch.as_tensor(sorted(set(range(c)) - gone), dtype=torch.long)
        keep[root], scores[root] = n_keep, score
        reference = [round(float(v), 5) for v in layer.reference().mean(-1)]
        decisions[root] = _Decision(n_keep, min(by_test, c - n_keep), max(0, c - n_keep - by_test),
                                    layer.tests, reference, time.perf_counter() - began)
    return _Pass(keep, scores, decisions)


@dataclass
class _Plan:
    """Everything a pass needs: problems per group, captured moments, processing order, options."""

    ctx: ScoringContext
    opts: MIPPOptions
    problems: dict[str, list[Problem]]
    moments: Moments
    order: list[str]
    channels: dict[str, int]
    widths: dict = field(default_factory=dict)

    def layer(self, root: str, kept: Mapping[str, torch.Tensor]) -> _Layer:
        probs = self.problems[root]
        if self.opts.estimator == "renyi":
            maps = [self.moments.pooled[(root, i)] for i in range(len(probs))]
            return _RenyiLayer(probs, maps, self.moments.folds, kept, self.channels[root], self.widths,
                               self.ctx.device)
        grams = [self.moments.grams[(root, i)] for i in range(len(probs))]
        return _PredictorLayer(probs, grams, kept, self.channels[root], self.ctx.device)


# ----------------------------------------------------------------------------------------------- the search


@dataclass
class _Search:
    """The pass whose keep counts are used, with how it was found."""

    result: _Pass
    t_star: float
    cap: float
    mode: str
    passes: int
    round_to: int


def _measure(plan: _Plan, total: int) -> Callable[[_Pass], float]:
    ctx = plan.ctx

    def removed(result: _Pass) -> float:
        result.achieved = engine.removed_fraction(ctx.model, ctx.example_input, ctx.groups, result.scores,
                                                  result.keep, metric=ctx.metric, total=total)
        return result.achieved

    return removed


def search(plan: _Plan) -> _Search:
    """Meet ``ctx.target`` with the confidence ``x`` (searched as ``log t``), else with a per-group cap on top.

    With ``mipp_confidence`` set, one pass at that confidence decides (the target is not searched).
    """
    ctx, opts = plan.ctx, plan.opts
    dof = opts.repeats - 1
    measure = _measure(plan, engine.measure(ctx.model, ctx.example_input, ctx.metric))
    if opts.confidence is not None:
        t_fixed = pr.confidence_threshold(opts.confidence, dof)
        result = _run_pass(plan, t_fixed, 1.0, opts.round_to)
        measure(result)
        return _Search(result, t_fixed, 1.0, "confidence", 1, opts.round_to)
    tries: list[tuple[float, float, _Pass]] = []
    align = opts.round_to

    def attempt(t_star: float, cap: float) -> _Pass:
        began = time.perf_counter()
        result = _run_pass(plan, t_star, cap, align)
        measure(result)
        tries.append((t_star, cap, result))
        log.debug("mipp pass %d: t=%.4g (x=%s) cap=%.3f round_to=%d removes %.4f of %s (%.1fs)", len(tries), t_star,
                  _confidence(t_star, dof), cap, align, result.achieved, ctx.metric, time.perf_counter() - began)
        return result

    found = _bisect_t(attempt, ctx.target)
    if found is None and align > 1:  # alignment best effort, as engine.allocate_uniform
        align = 1
        found = _bisect_t(attempt, ctx.target)
    if found is not None:
        return _Search(found[1], found[0], 1.0, "confidence", len(tries), align)
    under = [(t, r) for t, c, r in tries if c == 1.0 and r.achieved <= ctx.target]
    if not under:
        least = min(r.achieved for _, _, r in tries)
        raise PruningError(f"mipp removes {least:.3f} of {ctx.metric} even at confidence 0.5, more than --target "
                           f"{ctx.target:.2f}: the channels it drops carry no information; raise --target")
    t_star, _ = max(under, key=lambda tr: tr[1].achieved)
    found_cap = _bisect_cap(lambda cap: attempt(t_star, cap), ctx.target, opts.min_keep)
    if found_cap is None:
        best = min((r for _, _, r in tries), key=lambda r: abs(r.achieved - ctx.target))
        raise PruningError(f"target {ctx.target:.2f} of {ctx.metric} cannot be met within "
                           f"±{engine.TARGET_TOLERANCE:.2f} by mipp: the closest is {best.achieved:.3f}; try another "
                           f"--target or a lower --min-keep")
    return _Search(found_cap[1], t_star, found_cap[0], "cap", len(tries), align)


def _bisect_t(attempt: Callable[[float, float], _Pass], target: float) -> tuple[float, _Pass] | None:
    """Find the t threshold (the removed fraction grows with it): from :data:`T_START`, step by factors of 4 until
    the target is bracketed (within ``[T_MIN, T_MAX]``), then Illinois regula falsi on ``log t``. Returns the closest
    pass within ``engine.TARGET_TOLERANCE``, or None."""
    seen: list[tuple[float, _Pass]] = []

    def run(t: float) -> float:
        seen.append((t, attempt(t, 1.0)))
        return seen[-1][1].achieved - target

    t, f = T_START, run(T_START)
    lo: list[float] | None = None  # [log t, f] with f < 0
    hi: list[float] | None = None  # [log t, f] with f > 0
    last = 0
    while abs(f) > (SEARCH_TOL if len(seen) < PATIENCE else engine.TARGET_TOLERANCE) and len(seen) < MAX_PASSES:
        side = -1 if f < 0 else 1
        if side < 0:
            lo = [math.log(t), f]
        else:
            hi = [math.log(t), f]
        if lo is not None and hi is not None:
            if last == side:  # Illinois: the other end is stale, halve its value
                (hi if side < 0 else lo)[1] /= 2
            if hi[0] - lo[0] < 0.01:  # t known to 1%: near the transition the removed fraction jumps
                break
            frac = min(max(lo[1] / (lo[1] - hi[1]), 0.05), 0.95)
            t = math.exp(lo[0] + frac * (hi[0] - lo[0]))
        elif (side < 0 and t >= T_MAX) or (side > 0 and t <= T_MIN):
            break
        else:
            t = min(t * 4, T_MAX) if side < 0 else max(t / 4, T_MIN)
        last = side
        f = run(t)
    t_star, best = min(seen, key=lambda tr: abs(tr[1].achieved - target))
    return (t_star, best) if abs(best.achieved - target) <= engine.TARGET_TOLERANCE else None


def _bisect_cap(attempt: Callable[[float], _Pass], target: float, min_keep: float
                ) -> tuple[float, _Pass] | None:
    """Bisection on the cap fraction ``ρ`` (the removed fraction falls as ``ρ`` grows)."""
    lo, hi = min_keep, 1.0
    seen = []
    for _ in range(MAX_PASSES):
        mid = (lo + hi) / 2
        result = attempt(mid)
        seen.append((mid, result))
        if abs(result.achieved - target) <= SEARCH_TOL:
            break
        lo, hi = (mid, hi) if result.achieved > target else (lo, mid)
    cap, best = min(seen, key=lambda cr: abs(cr[1].achieved - target))
    return (cap, best) if abs(best.achieved - target) <= engine.TARGET_TOLERANCE else None


# ----------------------------------------------------------------------------------------------------- scorer


def processing_order(problems: Mapping[str, list[Problem]], order: Mapping[tuple[str, str], int]) -> list[str]:
    """Groups from the outputs back: by the execution index of their last read, latest first."""
    last = {root: max(order[(p.consumer, "in")] for p in probs) for root, probs in problems.items()}
    return sorted(problems, key=lambda r: (-last[r], r))


@register_scorer
class MIPPScorer(Scorer):
    """Mutual-information-preserving pruning (Westphal et al. 2024): each layer keeps what the next layer needs,
    from the outputs back; see the module docstring.

    Options (``method_options``): ``mipp_estimator`` (``predictor``/``renyi``), ``mipp_confidence`` (``x`` in
    [0.5, 1); unset: searched to meet ``--target``), ``mipp_repeats`` (folds of the loss estimate, 5),
    ``mipp_positions`` (positions sampled per image, 16), ``mipp_block`` (channels tested together, 8),
    ``mipp_pool`` (renyi: maps pooled to this size, 4); ``ctx.options`` may carry ``min_keep`` and ``round_to``.
    """

    name = "mipp"
    requires_data = True
    description = "mutual-information-preserving pruning, outputs to inputs (Westphal et al. 2024)"

    def score(self, ctx: ScoringContext) -> ScoringResult:
        opts = parse_options({**self.options, **ctx.options})
        if ctx.calib is None:
            raise InputError("--method mipp needs calibration data; pass --data")
        start = time.perf_counter()
        taps = find_taps(ctx.model, ctx.graph, ctx.groups)
        problems = find_problems(ctx.model, ctx.graph, ctx.groups)
        moments, order = capture(ctx.model, problems, taps, ctx.graph, ctx.calib, opts, seed=ctx.seed)
        captured = time.perf_counter()
        channels = {g.root: g.channels for g in ctx.groups}
        plan = _Plan(ctx, opts, problems, moments, processing_order(problems, order), channels)
        found = search(plan)
        done = time.perf_counter()
        result = found.result
        dof = opts.repeats - 1
        info = {
            "estimator": opts.estimator, "confidence": _confidence(found.t_star, dof),
            "t_threshold": round(found.t_star, 4), "search": found.mode, "passes": found.passes,
            "cap": round(found.cap, 4), "achieved": round(result.achieved, 4), "repeats": opts.repeats,
            "positions": opts.positions if opts.estimator == "predictor" else None,
            "pool": opts.pool if opts.estimator == "renyi" else None, "samples": int(moments.folds.numel()),
            "cache_mb": round(moments.nbytes() / 2**20, 1),
            "aligned": found.round_to == opts.round_to,
            "order": list(plan.order),
            "seconds": {"capture": round(captured - start, 3), "search": round(done - captured, 3),
                        "total": round(done - start, 3)},
            "keep": {r: int(result.keep[r]) for r in plan.order},
            "layers": [_layer_info(plan, r, result.decisions[r]) for r in plan.order],
        }
        return ScoringResult(result.scores, keep=dict(result.keep), info={"mipp": info})


def _confidence(t_star: float, dof: int) -> float:
    """``x = F_{dof}(t)``, rounded to the digits that differ from 1 (``1 - 1e-9`` stays distinguishable)."""
    x = pr.student_t_cdf(t_star, dof)
    if x >= 1.0:
        return 1.0
    digits = max(4, math.ceil(-math.log10(1.0 - x)) + 2)
    return round(x, digits)


def _layer_info(plan: _Plan, root: str, d: _Decision) -> dict[str, Any]:
    probs = plan.problems[root]
    return {
        "root": root, "channels": plan.channels[root], "keep": d.keep, "removed_by_test": d.by_test,
        "removed_by_cap": d.by_cap, "tests": d.tests, "reference": d.reference,
        "consumers": [p.consumer for p in probs],
        "targets": [p.target[0] + (" (output)" if p.target[1] else " (input)") for p in probs],
        "conditioned": [p.cond is not None for p in probs], "seconds": round(d.seconds, 3),
    }
