"""One budget search: the keep counts per pruning group that remove ``--target`` of a metric (issue 11, item 4).

Every pruning method meets its target here, whatever decides its keep counts: a uniform schedule (``l1``,
``random``: :func:`allocate_uniform`), a shared threshold ``t`` over information curves (``cmi``) or a confidence
and a cap (``mipp``). A method supplies only its own one-dimensional search at one alignment (``search_at``, see
:func:`meet_target`); the policy is the same for all of them:

1. **Floors.** A group of ``C`` channels keeps at least ``max(1, ceil(min_keep * C))`` channels, rounded up to the
   alignment in use and capped at ``C`` (:func:`floor_keep`).
2. **Reachability first.** Every group at its floor removes the most that can be removed; a target above that (by
   more than :data:`TARGET_TOLERANCE`) is refused before any search, with the limit in the message.
3. **Alignment.** The search runs at the requested ``round_to``. When the allocation closest to the target misses
   it by more than :data:`TARGET_TOLERANCE` (aligned blocks too coarse), the alignment is halved, 8 → 4 → 2 → 1,
   and the finer search is capped by the closest allocation *under* the target at the coarser alignment: a group
   keeps its coarser count unless it must shrink further, so as many groups as possible stay at the coarser
   alignment. :class:`Allocation` records the alignment each group got.
4. **Choice.** Of the allocations an alignment's search evaluated, the closest to the target wins (ties: the one
   evaluated first); it is accepted within ±:data:`TARGET_TOLERANCE`.
5. **Failure.** One line (:func:`unreachable`): the target, the closest allocation, the most that can be removed
   with ``min_keep``, and what to change.

Removed fractions are measured (never estimated) by a :class:`Meter`, which caches them per allocation and counts
the evaluations; :func:`compressor.pruning.engine.meter` builds one for a model. This module knows nothing of
models, only of groups (``root``, ``channels``) and keep counts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import PruningError

__all__ = [
    "TARGET_TOLERANCE", "Allocation", "GroupLike", "Meter", "SearchAt", "Trial", "aligned_to", "alignments",
    "allocate_uniform", "bisect", "closest", "floor_keep", "meet_target", "removal_schedule", "round_up",
    "uniform_search", "unreachable",
]

#: A target is met when the removed fraction is within this distance of it.
TARGET_TOLERANCE = 0.02


class GroupLike(Protocol):
    """What the budget reads of a pruning group (:class:`compressor.pruning.engine.PruningGroup`)."""

    @property
    def root(self) -> str: ...

    @property
    def channels(self) -> int: ...


# ---------------------------------------------------------------------------------------- floors, alignment


def alignments(round_to: int) -> list[int]:
    """The alignments tried in order: ``round_to`` halved down to 1 (``8 -> [8, 4, 2, 1]``, ``6 -> [6, 3, 1]``)."""
    out = [max(1, int(round_to))]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def round_up(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k`` (``k <= 1``: unchanged)."""
    return n if k <= 1 else int(math.ceil(n / k) * k)


def floor_keep(channels: int, *, min_keep: float, round_to: int) -> int:
    """Fewest channels a group may keep: ``max(1, ceil(min_keep * C))`` rounded up to ``round_to`` (capped at C)."""
    floor = max(1, math.ceil(min_keep * channels))
    return min(channels, round_up(floor, round_to))


def aligned_to(keep: int, channels: int, round_to: int) -> int | None:
    """The alignment a keep count got: the largest of :func:`alignments` (``round_to``) dividing it; None for a group
    that keeps all its channels (not pruned)."""
    if keep >= channels:
        return None
    return next(a for a in alignments(round_to) if keep % a == 0)


# ------------------------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class Trial:
    """One allocation a search evaluated: keep counts, the fraction they remove, the search parameters behind them."""

    keep: dict[str, int]
    achieved: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Allocation:
    """Keep counts meeting the target, as every pruning method reports them.

    Attributes
    ----------
    keep : dict
        Channels kept per group (by root layer name).
    achieved : float
        Fraction of the metric they remove (measured).
    target, metric, round_to :
        What was asked.
    aligned_to : dict
        Per group, the alignment its keep count got (:func:`aligned_to`; None: not pruned).
    evaluations : int
        Allocations measured (each a pruned copy of the model).
    params : dict
        The method's search parameters of the chosen allocation (``cmi``: ``t``; ``mipp``: threshold, cap...).
    """

    keep: dict[str, int]
    achieved: float
    target: float
    metric: str
    round_to: int
    aligned_to: dict[str, int | None]
    evaluations: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def aligned(self) -> bool:
        """True when every pruned group is at the requested alignment."""
        return all(a is None or a == self.round_to for a in self.aligned_to.values())

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view for a report (rounded)."""
        params = {k: round(v, 5) if isinstance(v, float) else v for k, v in self.params.items()}
        return {"achieved": round(self.achieved, 4), "round_to": self.round_to, "aligned": self.aligned,
                "aligned_to": dict(self.aligned_to), "evaluations": self.evaluations, **params}


class Meter:
    """The removed fraction of an allocation, measured by ``fraction(keep, scores)``, cached per allocation when no
    scores are given, with the number of measurements in :attr:`evaluations`."""

    def __init__(self, roots: Sequence[str], fraction: Callable[[Mapping[str, int], Any], float]) -> None:
        self.roots = list(roots)
        self.fraction = fraction
        self.evaluations = 0
        self._cache: dict[tuple[int, ...], float] = {}

    def __call__(self, keep: Mapping[str, int], scores: Any = None) -> float:
        key = tuple(int(keep[r]) for r in self.roots)
        if scores is None and key in self._cache:
            return self._cache[key]
        self.evaluations += 1
        value = float(self.fraction(keep, scores))
        if scores is None:
            self._cache[key] = value
        return value

    def trial(self, keep: Mapping[str, int], scores: Any = None, **params: Any) -> Trial:
        """Measure ``keep`` and return it as a :class:`Trial` with ``params``."""
        return Trial(dict(keep), self(keep, scores), params)


# ------------------------------------------------------------------------------------------------- policy

#: A method's search at one alignment: ``search_at(align, cap)`` returns the allocations it evaluated, in order,
#: each keep count a multiple of ``align`` (or its group's width or the aligned floor) and at most ``cap[root]``.
SearchAt = Callable[[int, "Mapping[str, int] | None"], Sequence[Trial]]


def closest(trials: Sequence[Trial], target: float) -> Trial:
    """The trial closest to ``target``; ties go to the earlier one."""
    return min(trials, key=lambda t: abs(t.achieved - target))


def unreachable(target: float, metric: str, *, closest: float, most: float, min_keep: float,
                groups: int) -> PruningError:
    """The one-line error of every method whose keep counts cannot meet ``target`` within the tolerance."""
    if target > most:
        advice = "lower --target or --min-keep"
    elif closest > target:
        advice = "raise --target"
    else:
        advice = f"try another --target (e.g. {closest:.2f})"
    return PruningError(f"target {target:.2f} of {metric} is not reachable within ±{TARGET_TOLERANCE:.2f}: the "
                        f"closest is {closest:.3f} and at most {most:.3f} can be removed with min_keep={min_keep:g} "
                        f"({groups} prunable groups); {advice}")


def meet_target(groups: Sequence[GroupLike], search_at: SearchAt, meter: Meter, *, target: float, metric: str,
                round_to: int, min_keep: float) -> Allocation:
    """Run ``search_at`` at ``round_to``, halving the alignment while the closest allocation misses ``target``
    (see the module docstring); return the accepted allocation or raise :func:`unreachable`."""
    floors = {g.root: floor_keep(g.channels, min_keep=min_keep, round_to=1) for g in groups}
    most = meter(floors)
    if target > most + TARGET_TOLERANCE:
        raise unreachable(target, metric, closest=most, most=most, min_keep=min_keep, groups=len(groups))
    cap: dict[str, int] | None = None
    tried: list[Trial] = []
    for align in alignments(round_to):
        trials = list(search_at(align, cap))
        if not trials:
            continue
        tried += trials
        best = closest(trials, target)
        if abs(best.achieved - target) <= TARGET_TOLERANCE:
            return Allocation(best.keep, best.achieved, target, metric, round_to,
                              {g.root: aligned_to(best.keep[g.root], g.channels, round_to) for g in groups},
                              meter.evaluations, dict(best.params))
        under = [t for t in trials if t.achieved <= target]
        if under:
            cap = max(under, key=lambda t: t.achieved).keep
    nearest = closest(tried, target).achieved if tried else most
    raise unreachable(target, metric, closest=nearest, most=most, min_keep=min_keep, groups=len(groups))


def bisect(evaluate: Callable[[float], Trial], target: float, lo: float, hi: float, *, iterations: int,
           stop: float) -> list[Trial]:
    """Bisection on a parameter in ``[lo, hi]`` whose removed fraction falls as it grows (more channels kept):
    every evaluated trial in order; stops early when one lands within ``stop`` of the target."""
    trials = []
    for _ in range(iterations):
        mid = (lo + hi) / 2
        trial = evaluate(mid)
        trials.append(trial)
        if abs(trial.achieved - target) < stop:
            break
        lo, hi = (mid, hi) if trial.achieved > target else (lo, mid)
    return trials


# --------------------------------------------------------------------------------------- uniform schedule


def removal_schedule(
    groups: Sequence[GroupLike], *, min_keep: float, round_to: int, start: Mapping[str, int] | None = None
) -> list[tuple[str, int]]:
    """Order in which blocks of ``round_to`` channels are removed so that groups shrink at the same relative pace.

    Each step takes one block from the group that keeps the largest fraction of its channels (ties: the wider
    group, then graph order), never going below the group's floor. Keep counts stay multiples of ``round_to``
    (after the first step of a group whose width is not one). ``start`` gives keep counts to continue from.
    Returns ``(group root, keep after the step)``.
    """
    start = start or {}
    heap = []
    for i, g in enumerate(groups):
        keep = int(start.get(g.root, g.channels))
        heap.append((-keep / g.channels, -g.channels, i, g.root, keep))
    heapq.heapify(heap)
    floors = {g.root: floor_keep(g.channels, min_keep=min_keep, round_to=round_to) for g in groups}
    steps = []
    while heap:
        _, neg_c, i, root, keep = heapq.heappop(heap)
        new = (keep - 1) // round_to * round_to if round_to > 1 else keep - 1
        if new < floors[root] or new <= 0:
            continue
        steps.append((root, new))
        heapq.heappush(heap, (-new / -neg_c, neg_c, i, root, new))
    return steps


def uniform_search(groups: Sequence[GroupLike], meter: Meter, *, target: float, min_keep: float) -> SearchAt:
    """The search of :func:`allocate_uniform` at one alignment: bisection on the number of :func:`removal_schedule`
    steps taken from ``cap`` (the removed fraction grows with it); returns the two prefixes bracketing the target."""

    def search_at(align: int, cap: Mapping[str, int] | None) -> list[Trial]:
        start = {g.root: int((cap or {}).get(g.root, g.channels)) for g in groups}
        steps = removal_schedule(groups, min_keep=min_keep, round_to=align, start=start)

        def keep_after(n: int) -> dict[str, int]:
            keep = dict(start)
            keep.update(dict(steps[:n]))  # later steps of a group overwrite earlier ones
            return keep

        lo, hi = 0, len(steps)  # smallest n with meter(n) >= target, or len(steps)
        while lo < hi:
            mid = (lo + hi) // 2
            if meter(keep_after(mid)) >= target:
                hi = mid
            else:
                lo = mid + 1
        return [meter.trial(keep_after(n), blocks=n) for n in sorted({max(lo - 1, 0), lo})]

    return search_at


def allocate_uniform(groups: Sequence[GroupLike], meter: Meter, *, target: float, metric: str, min_keep: float,
                     round_to: int) -> Allocation:
    """Keep counts, shrinking all groups at the same relative pace, that remove ``target`` of ``metric``."""
    search_at = uniform_search(groups, meter, target=target, min_keep=min_keep)
    return meet_target(groups, search_at, meter, target=target, metric=metric, round_to=round_to, min_keep=min_keep)
