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

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..pruning.scorers import Scorer, ScoringContext, ScoringResult, register_scorer
from ..scoring import predictor as pr
from ..scoring.mutual_info import kernel_width, pairwise_sq_dists
from . import reject_unknown_options
from .cmi import find_taps
from .mipp_capture import Moments, Problem, capture, find_problems
from .mipp_search import _confidence, _Decision, search

ESTIMATORS = ("predictor", "renyi")
OPTION_KEYS = ("mipp_estimator", "mipp_confidence", "mipp_repeats", "mipp_positions", "mipp_block", "mipp_pool")
RUN_KEYS = ("min_keep", "round_to")
#: Ridge penalty relative to the mean diagonal of the design's Gram (numerical safety, not a prior).
RIDGE = 1e-3


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

    def layer(self, root: str, kept: Mapping[str, torch.Tensor]) -> _Layer:
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


def _layer_info(plan: _Plan, root: str, d: _Decision) -> dict[str, Any]:
    probs = plan.problems[root]
    return {
        "root": root, "channels": plan.channels[root], "keep": d.keep, "removed_by_test": d.by_test,
        "removed_by_cap": d.by_cap, "tests": d.tests, "reference": d.reference,
        "consumers": [p.consumer for p in probs],
        "targets": [p.target[0] + (" (output)" if p.target[1] else " (input)") for p in probs],
        "conditioned": [p.cond is not None for p in probs], "seconds": round(d.seconds, 3),
    }
