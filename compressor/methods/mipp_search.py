"""Deciding the keep counts of ``--method mipp`` (steps 3 and 4 of :mod:`compressor.methods.mipp`).

Within a group, :func:`terc` tests channels from the least informative alone to the most, in adaptive blocks
bisected when they fail, and :func:`eliminate` removes greedily what a cap or ``round_to`` alignment asks for. One
pass (:func:`run_pass`) decides every group from the outputs back at one t threshold and cap; :func:`search` runs
passes until the keep counts meet ``--target``, under the budget policy of :mod:`compressor.pruning.budget` (floors,
tolerance, alignment halved 8 -> 4 -> 2 -> 1 with the coarser counts as a ceiling, one error wording): at each
alignment on the confidence ``x = F_{K-1}(t)`` (Illinois regula falsi on ``log t``), then, where no ``x`` lands,
with a bisected per-group cap ``ceil(ρ C)`` on top. The estimators are reached only through :class:`LayerTest`
and a :class:`SearchPlan` that builds them, so this module imports nothing else of ``mipp``.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..pruning import budget, engine
from ..pruning.budget import TARGET_TOLERANCE, floor_keep
from ..scoring import predictor as pr
from .prune import ScoringContext

__all__ = ["Decision", "Found", "LayerTest", "Pass", "SearchPlan", "confidence_of", "eliminate", "run_pass",
           "search", "terc"]

log = logging.getLogger("compressor")

#: Search range of the t threshold (x = F_{K-1}(t)): 0.01 is x = 0.5037; 1e4 removes all but the floors in practice.
#: The search starts at T_START (x = 0.9993 for 5 repeats), where trained CIFAR ResNets remove about a third.
T_MIN, T_START, T_MAX = 0.01, 8.0, 1e4
#: The search stops when the removed fraction is this close to the target, after PATIENCE passes when it is within the
#: pipeline's ±0.02, and after MAX_PASSES passes in any case.
SEARCH_TOL = 0.01
PATIENCE = 6
MAX_PASSES = 10


class LayerTest(abc.ABC):
    """The measure of one group during one pass: per problem (consumer) the reference, and the loss increase of
    masking ``removed ∪ J``, as ``K`` paired values; per channel its information alone. Implemented by the
    estimators of :mod:`compressor.methods.mipp`."""

    channels: int
    tests: int = 0

    @abc.abstractmethod
    def reference(self) -> torch.Tensor:
        """``(P, K)``: the loss (or information) of all present channels, per problem and fold."""

    @abc.abstractmethod
    def solo(self) -> torch.Tensor:
        """``(C,)``: information of each channel alone, higher = more."""

    @abc.abstractmethod
    def delta(self, sets: torch.Tensor) -> torch.Tensor:
        """``(B, j)`` channel sets -> ``(B, P, K)`` loss increase of masking each set with those removed."""

    @abc.abstractmethod
    def remove(self, channels: Sequence[int]) -> None:
        """Mask ``channels`` for good."""

    @abc.abstractmethod
    def t(self, deltas: torch.Tensor) -> torch.Tensor:
        """``(B, P, K) -> (B,)``: the largest per-problem t statistic."""


@dataclass
class SearchPlan:
    """What a pass needs: groups from the outputs back (``order``), their widths, the estimator of a group given the
    kept channels of the groups already decided (``layer``), the floor fraction and the TERC block size."""

    order: list[str]
    channels: dict[str, int]
    layer: Callable[[str, Mapping[str, torch.Tensor]], LayerTest]
    min_keep: float
    block: int


# ------------------------------------------------------------------------------------------------- one pass


@dataclass
class Decision:
    """One group's outcome in one pass: the keep count, how it was reached, the work done."""

    keep: int
    by_test: int
    by_cap: int
    tests: int
    reference: list[float]
    seconds: float


def terc(layer: LayerTest, t_star: float, room: int, block: int) -> list[int]:
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


def eliminate(layer: LayerTest, alive: list[int], count: int) -> list[int]:
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
class Pass:
    keep: dict[str, int]
    scores: dict[str, torch.Tensor]
    decisions: dict[str, Decision]
    achieved: float = math.nan


def run_pass(plan: SearchPlan, t_star: float, cap: float, round_to: int,
             ceiling: Mapping[str, int] | None = None) -> Pass:
    """Decide every group from the outputs back: TERC at ``t_star``, then the cap ``ceil(cap · C)``, floors,
    alignment to ``round_to`` and the budget's ``ceiling`` (keep counts of a coarser alignment); the kept channels
    of each group become the targets of the groups below."""
    kept: dict[str, torch.Tensor] = {}
    keep, scores, decisions = {}, {}, {}
    for root in plan.order:
        began = time.perf_counter()
        c = plan.channels[root]
        floor = floor_keep(c, min_keep=plan.min_keep, round_to=1)
        layer = plan.layer(root, kept)
        ranked = torch.argsort(layer.solo(), stable=True).tolist()
        removed = terc(layer, t_star, c - floor, plan.block)
        by_test = len(removed)
        n_keep = max(floor, min(c - by_test, math.ceil(cap * c - 1e-9)))
        if round_to > 1:  # to the nearest multiple, at least the aligned floor
            aligned = min(c, math.floor(n_keep / round_to + 0.5) * round_to)
            n_keep = max(aligned, floor_keep(c, min_keep=plan.min_keep, round_to=round_to))
        if ceiling is not None:
            n_keep = min(n_keep, ceiling[root])
        if n_keep > c - by_test:  # re-add the last removed
            removed = removed[: c - n_keep]
        alive = [ch for ch in ranked if ch not in set(removed)]
        removed += eliminate(layer, alive, len(alive) - n_keep)
        gone = set(removed)
        order = removed + [ch for ch in ranked if ch not in gone]
        score = torch.empty(c)
        score[torch.as_tensor(order)] = torch.arange(1, c + 1, dtype=torch.float32)
        kept[root] = torch.as_tensor(sorted(set(range(c)) - gone), dtype=torch.long)
        keep[root], scores[root] = n_keep, score
        reference = [round(float(v), 5) for v in layer.reference().mean(-1)]
        decisions[root] = Decision(n_keep, min(by_test, c - n_keep), max(0, c - n_keep - by_test),
                                    layer.tests, reference, time.perf_counter() - began)
    return Pass(keep, scores, decisions)


# ----------------------------------------------------------------------------------------------- the search


@dataclass
class Found:
    """The pass whose keep counts are used, with how it was found (``allocation`` is None at a fixed confidence)."""

    result: Pass
    t_star: float
    cap: float
    mode: str
    passes: int
    allocation: budget.Allocation | None


@dataclass
class _State:
    """What the search learnt at a coarser alignment: where to start on ``t``, and whether ``t`` alone can reach
    the target (it cannot when every threshold up to :data:`T_MAX` removes too little; then the cap takes over)."""

    t_start: float
    t_under: float | None = None
    confidence_reaches: bool = True


def search(plan: SearchPlan, ctx: ScoringContext, *, confidence: float | None, dof: int) -> Found:
    """Meet ``ctx.target`` with the confidence ``x`` (searched as ``log t``), else with a per-group cap on top, at
    each alignment of the budget policy. With ``confidence`` set, one pass at that confidence decides (the target
    is not searched)."""
    meter = engine.meter(ctx.model, ctx.example_input, ctx.groups, None, metric=ctx.metric)
    passes: list[Pass] = []

    def attempt(t_star: float, cap: float, align: int, ceiling: Mapping[str, int] | None) -> budget.Trial:
        began = time.perf_counter()
        result = run_pass(plan, t_star, cap, align, ceiling)
        passes.append(result)
        trial = meter.trial(result.keep, result.scores, t_threshold=t_star, cap=cap, pass_number=len(passes))
        result.achieved = trial.achieved
        log.debug("mipp pass %d: t=%.4g (x=%s) cap=%.3f round_to=%d removes %.4f of %s (%.1fs)", len(passes),
                  t_star, confidence_of(t_star, dof), cap, align, result.achieved, ctx.metric,
                  time.perf_counter() - began)
        return trial

    if confidence is not None:
        t_fixed = pr.confidence_threshold(confidence, dof)
        attempt(t_fixed, 1.0, ctx.round_to, None)
        return Found(passes[0], t_fixed, 1.0, "confidence", 1, None)
    search_at = _search_at(attempt, ctx.target, ctx.min_keep, _State(T_START))
    allocation = budget.meet_target(ctx.groups, search_at, meter, target=ctx.target, metric=ctx.metric,
                                    round_to=ctx.round_to, min_keep=ctx.min_keep)
    params = allocation.params
    mode = "confidence" if params["cap"] == 1.0 else "cap"
    return Found(passes[params["pass_number"] - 1], params["t_threshold"], params["cap"], mode, len(passes),
                 allocation)


def _search_at(attempt: Callable[[float, float, int, Mapping[str, int] | None], budget.Trial], target: float,
               min_keep: float, state: _State) -> budget.SearchAt:
    """mipp's search at one alignment: on ``t`` (unless a coarser alignment showed that ``t`` cannot reach the
    target); where no ``t`` lands and the target lies above a pass at some ``t``, on the cap at that ``t``. A target
    bracketed by ``t`` but missed (a step in the removed fraction) is left to a finer alignment, down to 1."""

    def search_at(align: int, ceiling: Mapping[str, int] | None) -> list[budget.Trial]:
        trials: list[budget.Trial] = []
        if state.confidence_reaches:
            trials = search_confidence(lambda t: attempt(t, 1.0, align, ceiling), target, start=state.t_start)
            best = budget.closest(trials, target)
            if abs(best.achieved - target) <= TARGET_TOLERANCE:
                return trials
            state.t_start = best.params["t_threshold"]  # a finer alignment starts where this one came closest
            under = [t for t in trials if t.achieved <= target]
            if not under:  # too much removed even at the lowest confidence: the cap cannot help
                return trials
            state.t_under = max(under, key=lambda t: t.achieved).params["t_threshold"]
            state.confidence_reaches = len(under) < len(trials)
            if state.confidence_reaches and align > 1:
                return trials
        t_under = state.t_under if state.t_under is not None else T_MAX
        trials += budget.bisect(lambda cap: attempt(t_under, cap, align, ceiling), target, min_keep, 1.0,
                                iterations=MAX_PASSES, stop=SEARCH_TOL)
        return trials

    return search_at


def search_confidence(run: Callable[[float], budget.Trial], target: float, *, start: float) -> list[budget.Trial]:
    """Passes on the t threshold (the removed fraction grows with it): from ``start``, step by factors of 4 until
    the target is bracketed (within ``[T_MIN, T_MAX]``), then Illinois regula falsi on ``log t``. Returns every
    pass in order (``params["t_threshold"]``)."""
    seen: list[budget.Trial] = []

    def value(t: float) -> float:
        seen.append(run(t))
        return seen[-1].achieved - target

    t, f = start, value(start)
    lo: list[float] | None = None  # [log t, f] with f < 0
    hi: list[float] | None = None  # [log t, f] with f > 0
    last = 0
    while abs(f) > (SEARCH_TOL if len(seen) < PATIENCE else TARGET_TOLERANCE) and len(seen) < MAX_PASSES:
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
        f = value(t)
    return seen


def confidence_of(t_star: float, dof: int) -> float:
    """``x = F_{dof}(t)``, rounded to the digits that differ from 1 (``1 - 1e-9`` stays distinguishable)."""
    x = pr.student_t_cdf(t_star, dof)
    if x >= 1.0:
        return 1.0
    digits = max(4, math.ceil(-math.log10(1.0 - x)) + 2)
    return round(x, digits)
