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
4. **Confidence and target.** ``x`` sets how aggressive pruning is. With ``confidence`` unset it is searched
   (on the equivalent t threshold, in log space) so that the keep counts remove ``--target`` of the metric within
   ±0.02; where no ``x`` can (the floors), the ``x`` that removes the most without passing the target is kept and
   a per-group cap ``ceil(ρ C)`` is bisected on top, met by greedy backward elimination (smallest loss increase
   first). ``--round-to`` alignment rounds each keep count to the nearest multiple inside the pass, by greedy
   elimination or by re-adding the last removed channels, so that the groups below predict what is really kept;
   where aligned counts step over the target, the budget policy of :mod:`compressor.pruning.budget` halves the
   alignment (8, 4, 2, 1) with the coarser counts under the target as a ceiling, as for every pruning method.

**Estimators** (``estimator``; maths in :mod:`compressor.scoring.predictor`):

* ``predictor`` (default): a linear predictor with the geometry of layer ``l+1`` (a ``k×k`` conv with its stride,
  padding and dilation, plus a bias) from ``[Z, X_l]`` to the post-nonlinearity ``X_{l+1}``, fitted by ridge least
  squares on ``repeats - 1`` folds of the calibration images and scored by the held-out fraction of variance
  unexplained on the last, at ``positions`` random positions per image. Why linear and not the conv followed
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
  matrices (maps average-pooled to ``pool``, as in ``--method cmi``); repeats are the ``K``
  delete-one-fold subsamples of the images, with the jackknife t statistic. Cheaper per search pass, blind to
  spatial layout; measured on ResNet-20/56 (``benchmarks/mipp_scoring.py``) it needed more passes to meet the target
  and kept less accuracy than ``predictor``, so it is not the default.

Cost: activations are captured once, in chunks of :data:`~compressor.methods.mipp_capture.CHUNK` images, and
reduced on the fly to per-fold Gram matrices (or pooled maps); every search pass reuses them. Linear algebra runs
in float64 on ``ctx.device``. This module holds the options, the per-layer estimators and the scorer;
:mod:`compressor.methods.mipp_capture` the problems (step 1) and the activation capture,
:mod:`compressor.methods.mipp_search` the test within a group, one pass and the search over ``x`` and the cap
(steps 3 and 4).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..options import option
from ..scoring import predictor as pr
from ..scoring.mutual_info import kernel_width, pairwise_sq_dists
from .cmi import find_taps
from .mipp_capture import Moments, Problem, capture, find_problems
from .mipp_search import Decision, Found, LayerTest, SearchPlan, confidence_of, search
from .prune import PruneMethod, Scores, ScoringContext

__all__ = ["MIPP", "MIPPOptions", "RIDGE", "processing_order"]

ESTIMATORS = ("predictor", "renyi")
#: Ridge penalty relative to the mean diagonal of the design's Gram (numerical safety, not a prior).
RIDGE = 1e-3


@dataclass(frozen=True)
class MIPPOptions:
    """Options of ``--method mipp`` (flags ``--mipp-*``). The per-group floor and the channel alignment are the
    run's ``--min-keep`` and ``--round-to``."""

    estimator: str = option("predictor", help="how the information a channel carries to the next layer is "
                            "measured: predictor (held-out loss of a linear predictor with the next layer's "
                            "geometry) or renyi (matrix-based Renyi MI: cheaper per pass but blind to spatial "
                            "layout; on ResNet-20/56 it needed more search passes and kept less accuracy)",
                            example="renyi", choices=ESTIMATORS)
    confidence: float | None = option(None, help="keep a channel only if removing it raises the loss with more "
                                      "than this confidence, in [0.5, 1); unset, it is searched to meet --target",
                                      example="0.95", low=0.5, high=1.0, high_open=True)
    repeats: int = option(5, help="repeats (folds) of the loss estimate behind each decision, at least 3",
                          example="7", low=3)
    positions: int = option(16, help="predictor: spatial positions sampled per image for each fit (more: finer "
                            "tests, slower capture)", example="32", low=1)
    block: int = option(8, help="channels tested together before a failing block is bisected (the size then "
                        "adapts: doubled after a block removed whole, halved after one kept whole)", example="4",
                        low=1)
    pool: int = option(4, help="renyi: average-pool maps to this size before the kernels", example="2", low=1)


# ------------------------------------------------------------------------------------------------ estimators


class _PredictorLayer(LayerTest):
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
        losses = [pr.removal_loss(fit, cols[sets.to(cols.device)].flatten(1))
                  for fit, cols in zip(self.fits, self.cols)]
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


class _RenyiLayer(LayerTest):
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


# ----------------------------------------------------------------------------------------------------- scorer


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

    def layer(self, root: str, kept: Mapping[str, torch.Tensor]) -> LayerTest:
        probs = self.problems[root]
        if self.opts.estimator == "renyi":
            maps = [self.moments.pooled[(root, i)] for i in range(len(probs))]
            return _RenyiLayer(probs, maps, self.moments.folds, kept, self.channels[root], self.widths,
                               self.ctx.device)
        grams = [self.moments.grams[(root, i)] for i in range(len(probs))]
        return _PredictorLayer(probs, grams, kept, self.channels[root], self.ctx.device)


def processing_order(problems: Mapping[str, list[Problem]], order: Mapping[tuple[str, str], int]) -> list[str]:
    """Groups from the outputs back: by the execution index of their last read, latest first."""
    last = {root: max(order[(p.consumer, "in")] for p in probs) for root, probs in problems.items()}
    return sorted(problems, key=lambda r: (-last[r], r))


class MIPP(PruneMethod):
    """Mutual-information-preserving pruning (Westphal et al. 2024): each layer keeps what the next layer needs,
    from the outputs back; see the module docstring. Options: :class:`MIPPOptions`; floors, alignment and the
    target come from the :class:`~compressor.methods.prune.ScoringContext`.
    """

    name = "mipp"
    summary = "mutual-information-preserving pruning, outputs to inputs (Westphal et al. 2024)"
    requires_data = True
    Options = MIPPOptions

    def score(self, ctx: ScoringContext) -> Scores:
        opts: MIPPOptions = self.options
        if ctx.calib is None:
            raise InputError("--method mipp needs calibration data; pass --data")
        start = time.perf_counter()
        taps = find_taps(ctx.model, ctx.graph, ctx.groups)
        problems = find_problems(ctx.model, ctx.graph, ctx.groups)
        moments, order = capture(ctx.model, problems, taps, ctx.graph, ctx.calib, opts, seed=ctx.seed)
        captured = time.perf_counter()
        channels = {g.root: g.channels for g in ctx.groups}
        plan = _Plan(ctx, opts, problems, moments, processing_order(problems, order), channels)
        found = search(SearchPlan(plan.order, channels, plan.layer, ctx.min_keep, opts.block), ctx,
                       confidence=opts.confidence, dof=opts.repeats - 1)
        done = time.perf_counter()
        seconds = {"capture": round(captured - start, 3), "search": round(done - captured, 3),
                   "total": round(done - start, 3)}
        return Scores(found.result.scores, keep=dict(found.result.keep),
                      report=_report(plan, found, moments, seconds))


def _report(plan: _Plan, found: Found, moments: Moments, seconds: dict[str, float]) -> dict[str, Any]:
    """The report section: what was searched and chosen, per group and in total."""
    opts, result = plan.opts, found.result
    aligned = (found.allocation.aligned if found.allocation is not None else
               all(k % plan.ctx.round_to == 0 or k == plan.channels[r] for r, k in result.keep.items()))
    report = {
        "estimator": opts.estimator, "confidence": confidence_of(found.t_star, opts.repeats - 1),
        "t_threshold": round(found.t_star, 4), "search": found.mode, "passes": found.passes,
        "cap": round(found.cap, 4), "achieved": round(result.achieved, 4), "repeats": opts.repeats,
        "positions": opts.positions if opts.estimator == "predictor" else None,
        "pool": opts.pool if opts.estimator == "renyi" else None, "samples": int(moments.folds.numel()),
        "cache_mb": round(moments.nbytes() / 2**20, 1), "aligned": aligned, "order": list(plan.order),
        "seconds": seconds, "keep": {r: int(result.keep[r]) for r in plan.order},
        "layers": [_layer_info(plan, r, result.decisions[r]) for r in plan.order],
    }
    if found.allocation is not None:
        report["allocation"] = found.allocation.summary()
    return report


def _layer_info(plan: _Plan, root: str, d: Decision) -> dict[str, Any]:
    probs = plan.problems[root]
    return {
        "root": root, "channels": plan.channels[root], "keep": d.keep, "removed_by_test": d.by_test,
        "removed_by_cap": d.by_cap, "tests": d.tests, "reference": d.reference,
        "consumers": [p.consumer for p in probs],
        "targets": [p.target[0] + (" (output)" if p.target[1] else " (input)") for p in probs],
        "conditioned": [p.cond is not None for p in probs], "seconds": round(d.seconds, 3),
    }
