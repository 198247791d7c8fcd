"""Deciding the keep counts of ``--method mipp`` (steps 3 and 4 of :mod:`compressor.methods.mipp`).

Within a group, :func:`_terc` tests channels from the least informative alone to the most, in adaptive blocks
bisected when they fail, and :func:`_eliminate` removes greedily what a cap or ``round_to`` alignment asks for. One
pass (:func:`_run_pass`) decides every group from the outputs back at one t threshold and cap; :func:`search` runs
passes until the keep counts meet ``--target``: on the confidence ``x = F_{K-1}(t)`` (Illinois regula falsi on
``log t``), else with a bisected per-group cap ``ceil(ρ C)`` on top. Only the interface of the estimators
(:class:`~compressor.methods.mipp._Layer`) is used here; the plan that builds them is
:class:`~compressor.methods.mipp._Plan`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import PruningError
from ..pruning import engine
from ..pruning.engine import floor_keep
from ..scoring import predictor as pr

if TYPE_CHECKING:
    from .mipp import _Layer, _Plan

log = logging.getLogger("compressor")

#: Search range of the t threshold (x = F_{K-1}(t)): 0.01 is x = 0.5037; 1e4 removes all but the floors in practice.
#: The search starts at T_START (x = 0.9993 for 5 repeats), where trained CIFAR ResNets remove about a third.
T_MIN, T_START, T_MAX = 0.01, 8.0, 1e4
#: The search stops when the removed fraction is this close to the target, after PATIENCE passes when it is within the
#: pipeline's ±0.02, and after MAX_PASSES passes in any case.
SEARCH_TOL = 0.01
PATIENCE = 6
MAX_PASSES = 10


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


def _confidence(t_star: float, dof: int) -> float:
    """``x = F_{dof}(t)``, rounded to the digits that differ from 1 (``1 - 1e-9`` stays distinguishable)."""
    x = pr.student_t_cdf(t_star, dof)
    if x >= 1.0:
        return 1.0
    digits = max(4, math.ceil(-math.log10(1.0 - x)) + 2)
    return round(x, digits)
