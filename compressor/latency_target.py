"""``--target-latency F``: meet a measured latency budget instead of a filter/param/MAC fraction (issue 12, item 5).

The budget is a fraction ``F`` of the original model's p50 latency **on the graph the run ships** (INT8 when the run
quantises, else fp32), at the first ``--bench-batch`` on the benchmark's onnxruntime threads. The search never uses a
MAC proxy: every probe is a real compression of the model at some fraction ``t`` of ``--target-metric``, exported
(and quantised), and timed **in the same onnxruntime call as the original** (:class:`compressor.widths.OnnxLatency`),
so machine noise hits both sides of the ratio ``r(t) = p50(compressed at t) / p50(original)``.

Search (:func:`search_target`): the least compression that meets the budget, since every channel removed costs
accuracy.

1. Probe ``t_hi`` (:data:`MAX_TARGET`; lowered by 15 % while the method cannot reach it). ``r(t_hi) > F``: the
   budget is out of reach, a one-line error names the best ratio measured.
2. Bisect ``t`` in ``(0, t_hi]`` for ``probes`` more probes (``r`` falls as ``t`` grows, up to noise and channel
   alignment steps): a probe that meets ``F`` becomes the new upper end, one that misses the lower end.
3. Keep the smallest ``t`` whose probe met ``F``. Every probe (``t``, achieved fraction, MACs, both p50s, the ratio)
   goes into the report, so the choice can be checked.

With ``--round-to auto`` the first probe chooses the alignment (:mod:`compressor.widths`) and the later probes keep
it: the fastest channel block is a property of the kernels, and timing 6 alignments per probe would multiply the
search's cost by 6.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import PruningError

__all__ = ["MAX_TARGET", "PROBES", "LatencyChoice", "Probe", "search_target"]

#: The first (largest) fraction probed.
MAX_TARGET = 0.8
#: Bisection probes after the first.
PROBES = 5
#: Times the first probe's fraction is lowered (x0.85 each) while the method cannot reach it.
RETRIES = 6

#: Times models together: ``{key: model} -> {key: p50 ms}`` (:class:`compressor.widths.OnnxLatency`).
Timer = Callable[[Mapping[int, nn.Module]], Mapping[int, float]]


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
class Built:
    """A compression at one fraction: the model, the fraction achieved, its MACs, and what the builder wants back."""

    model: nn.Module
    achieved: float
    macs: int
    result: Any = None


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


def search_target(build: Callable[[float], Built], timer: Timer, original: nn.Module, goal: float, *,
                  high: float = MAX_TARGET, probes: int = PROBES) -> LatencyChoice:
    """The smallest fraction ``t`` whose compression ``build(t)`` runs within ``goal`` x the original's latency.

    ``build(t)`` raises :class:`~compressor.errors.PruningError` when ``t`` cannot be reached; ``timer`` times the
    original (key 0) and a probe (key 1) in one call. See the module docstring for the search.
    Raises :class:`PruningError` when even the largest reachable fraction misses ``goal``.
    """
    if not 0.0 < goal < 1.0:
        raise ValueError(f"goal must be in (0, 1); got {goal}")
    start = time.perf_counter()
    made: list[tuple[Probe, Built]] = []

    def probe(t: float) -> tuple[Probe, Built]:
        built = build(t)
        p50 = timer({0: original, 1: built.model})
        made.append((Probe(t, built.achieved, built.macs, float(p50[1]), float(p50[0])), built))
        return made[-1]

    high_probe = _first_probe(probe, high)
    if high_probe.ratio > goal:
        raise PruningError(f"--target-latency {goal:g} is out of reach: removing {high_probe.achieved:.2f} of the "
                           f"metric runs at {high_probe.ratio:.2f}x the original's latency "
                           f"({high_probe.p50_ms:.3f} vs {high_probe.original_p50_ms:.3f} ms); raise "
                           f"--target-latency (e.g. {min(0.99, high_probe.ratio + 0.05):.2f})")
    lo, hi = 0.0, high_probe.target
    for _ in range(probes):
        mid = (lo + hi) / 2
        try:
            p, _ = probe(mid)
        except PruningError:  # not reachable at this alignment: treat as too little removed
            lo = mid
            continue
        lo, hi = (lo, mid) if p.ratio <= goal else (mid, hi)
    met = [(p, b) for p, b in made if p.ratio <= goal]
    chosen, built = min(met, key=lambda pb: pb[0].target)
    return LatencyChoice(goal, chosen, built, tuple(p for p, _ in made), time.perf_counter() - start)


def _first_probe(probe: Callable[[float], tuple[Probe, Built]], high: float) -> Probe:
    """Probe ``high``, lowering it by 15 % while the method refuses it as unreachable."""
    t = high
    for attempt in range(RETRIES + 1):
        try:
            return probe(t)[0]
        except PruningError:
            if attempt == RETRIES:
                raise
            t = round(t * 0.85, 4)
    raise AssertionError("unreachable")  # pragma: no cover
