"""``--target-latency F``: meet a measured latency budget instead of a filter/param/MAC fraction (issue 12, item 5).

The budget is a fraction ``F`` of the original model's p50 latency **on the graph the run ships** (INT8 when the run
quantises, else fp32), at the first ``--bench-batch`` on the benchmark's onnxruntime threads. The search never uses a
MAC proxy: every probe is a real compression of the model at some fraction ``t`` of ``--target-metric``, exported
(and quantised), and timed **in the same onnxruntime call as the original** (:class:`compressor.widths.OnnxLatency`),
so machine noise hits both sides of the ratio ``r(t) = p50(compressed at t) / p50(original)``.

Search (:func:`search_target`): the least compression that meets the budget, since every channel removed costs
accuracy.

1. A coarse grid, smallest first: ``t = 0.2, 0.4, 0.6, 0.8`` (:data:`GRID` points up to :data:`MAX_TARGET`), until
   one meets ``F`` (a fraction the method cannot reach ends the grid). None does: the budget is out of reach, and a
   one-line error names the best ratio measured. The grid starts small because latency is *not* monotone in ``t``
   at the extremes: on ResNet-56 INT8 at batch 1, one thread, removing 0.8 of the filters (``l1``, ``--round-to
   16``) ran at 1/1.06 of the INT8 original's latency (the per-node overhead dominates), worse than 0.4 removed
   (0.79 in ``benchmarks/results/target_latency-int8-0.8.json``; the command is in the README).
2. Bisect between the last grid miss and the first hit (:data:`PROBES` probes): a probe that meets ``F`` becomes
   the new upper end, one that misses the lower end.
3. Keep the smallest ``t`` whose probe met ``F``. Every probe (``t``, achieved fraction, MACs, both p50s, the ratio)
   goes into the report, so the choice can be checked.

With ``--round-to auto`` the first probe chooses the alignment (:mod:`compressor.widths`) and the later probes keep
it: the fastest channel block is a property of the kernels, and timing 6 alignments per probe would multiply the
search's cost by 6.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import PruningError
from .widths import Built, Measure  # a probe is built like an alignment candidate (``key`` unused), timed alike

__all__ = ["GRID", "MAX_TARGET", "PROBES", "Built", "LatencyChoice", "Probe", "search_target"]

#: The largest fraction probed.
MAX_TARGET = 0.8
#: Grid points (``MAX_TARGET * k / GRID``, k = 1..GRID) probed smallest first.
GRID = 4
#: Bisection probes after the grid.
PROBES = 3



@dataclass(frozen=True)
class Probe:
    """One fraction tried: its compressed model's p50 beside the original's, timed in one call."""

    target: float
    achieved: float
    macs: int
    p50_ms: float
    original_p50_ms: float

    @property
    def ratio(self) -> float:
        """``p50 / original p50``: the fraction of the original's latency."""
        return self.p50_ms / self.original_p50_ms

    def row(self, goal: float) -> dict[str, Any]:
        """JSON-friendly row for the report."""
        return {"target": round(self.target, 4), "achieved": round(self.achieved, 4), "macs": self.macs,
                "p50_ms": round(self.p50_ms, 5), "original_p50_ms": round(self.original_p50_ms, 5),
                "ratio": round(self.ratio, 4), "met": self.ratio <= goal}


@dataclass(frozen=True)
class LatencyChoice:
    """The smallest fraction that met the budget (``chosen``), its build, and every probe in the order made."""

    goal: float
    chosen: Probe
    built: Built
    probes: tuple[Probe, ...]
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def section(self, **how: Any) -> dict[str, Any]:
        """The report's ``latency_target`` section; ``how`` says what was timed (graph, batch, threads)."""
        return {"goal": self.goal, "target": round(self.chosen.target, 4), "ratio": round(self.chosen.ratio, 4),
                "probes": [p.row(self.goal) for p in self.probes], "seconds": round(self.seconds, 3),
                **self.notes, **how}


def search_target(build: Callable[[float], Built], timer: Measure, original: nn.Module, goal: float, *,
                  high: float = MAX_TARGET, grid: int = GRID, probes: int = PROBES) -> LatencyChoice:
    """The smallest fraction ``t`` whose compression ``build(t)`` runs within ``goal`` x the original's latency.

    ``build(t)`` raises :class:`~compressor.errors.PruningError` when ``t`` cannot be reached; ``timer`` times the
    original (key 0) and a probe (key 1) in one call. See the module docstring for the search.
    Raises :class:`PruningError` when no fraction probed meets ``goal``.
    """
    if not 0.0 < goal < 1.0:
        raise ValueError(f"goal must be in (0, 1); got {goal}")
    start = time.perf_counter()
    made: list[tuple[Probe, Built]] = []

    def probe(t: float) -> Probe | None:
        try:
            built = build(t)
        except PruningError:
            return None
        p50 = timer({0: original, 1: built.model})
        made.append((Probe(t, built.achieved, built.macs, float(p50[1]), float(p50[0])), built))
        return made[-1][0]

    lo, hi = 0.0, None
    for k in range(1, grid + 1):  # 1) the coarse grid, smallest first, until one meets the goal
        t = round(high * k / grid, 4)
        p = probe(t)
        if p is None:  # unreachable: so is every larger fraction
            break
        if p.ratio <= goal:
            hi = t
            break
        lo = t
    if hi is None:
        raise _out_of_reach(goal, [p for p, _ in made])
    for _ in range(probes):  # 2) bisection between the last miss and the first hit
        mid = round((lo + hi) / 2, 4)
        p = probe(mid)
        lo, hi = (lo, mid) if p is not None and p.ratio <= goal else (mid, hi)
    chosen, built = min(((p, b) for p, b in made if p.ratio <= goal), key=lambda pb: pb[0].target)
    return LatencyChoice(goal, chosen, built, tuple(p for p, _ in made), time.perf_counter() - start)


def _out_of_reach(goal: float, probes: list[Probe]) -> PruningError:
    """The one-line error when no probe met the goal: the best ratio measured and where."""
    if not probes:
        return PruningError(f"--target-latency {goal:g}: the method could not reach any fraction probed; lower "
                            "--min-keep or use another --method")
    best = min(probes, key=lambda p: p.ratio)
    return PruningError(f"--target-latency {goal:g} is out of reach: the fastest probe (removing {best.achieved:.2f} "
                        f"of the metric) runs at {best.ratio:.2f}x the original's latency ({best.p50_ms:.3f} vs "
                        f"{best.original_p50_ms:.3f} ms; {len(probes)} probes up to {max(p.target for p in probes):g})"
                        f"; raise --target-latency (e.g. {min(0.99, best.ratio + 0.05):.2f})")
