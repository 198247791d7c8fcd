"""Channel widths chosen by measured latency: ``--round-to auto`` (issue 12, item 4).

onnxruntime's CPU convolutions work in channel blocks, so *which* multiple the pruned widths land on matters as much
as how many MACs they remove, and the best multiple depends on the model, the machine, the precision (fp32 or INT8),
the batch size and the threads. Rather than fix it, :func:`choose_alignment` builds the pruned model at every
candidate alignment (:data:`DEFAULT_CANDIDATES`, capped by :func:`candidate_alignments` at the widths the model
has), times all of them with one injected ``measure`` and keeps the fastest that met the target.

``measure`` takes every candidate model at once and returns each one's latency (p50, ms), so that the real one,
:class:`OnnxLatency`, can time them **interleaved in one benchmark call** (machine noise shared): it exports each
model to ONNX, quantises it to INT8 (:func:`compressor.quantize.quantize_int8`, the default format) when the run
ships INT8, and times the graphs with :func:`exporters.benchmark_latency` at the run's first ``--bench-batch`` and
onnxruntime threads. Tests inject a fake timer. Candidates whose pruned graphs are identical (same keep counts) are
timed once. A run that times nothing (``--bench-batch none``) gets :data:`UNTIMED` without any measurement. In a
chain (``l1+tucker``) the pruning step's graph is timed, before the factorisation that follows it.

Measured by ``python -m benchmarks.round_to_auto`` (``benchmarks/results/round_to_auto.json``): ResNet-56 ``l1``
at 0.33 pruned at each K, fp32 and INT8, all 14 graphs interleaved in one call per batch and thread count, 2 rounds;
speed-up over the fp32 original of the same call, median of the rounds (2-CPU AMD EPYC VM at load 4.5-7, onnxruntime
1.32; "dft" = onnxruntime's default threads)::

    K                    1     2     4     8     16    32    INT8 original
    fp32  b1   1 t     1.12  1.13  1.09  1.15  2.63  1.15
    fp32  b1   dft     1.22  1.14  1.13  1.36  3.29  1.83
    fp32  b32  1 t     1.11  1.13  1.11  1.34  1.88  1.28
    fp32  b32  dft     1.00  1.18  1.08  1.31  1.80  1.26
    INT8  b1   1 t     3.18  3.12  3.85  4.18  4.78  5.22  4.49
    INT8  b1   dft     1.82  1.98  2.16  2.27  2.71  2.89  3.67
    INT8  b32  1 t     1.78  1.94  2.38  2.57  2.99  3.07  2.48
    INT8  b32  dft     1.40  1.70  1.87  1.99  2.48  2.64  2.34

K = 16 won all 8 fp32 runs and K = 32 all 8 INT8 runs: no fixed K is best for both graphs, and the old default 8
is beaten by both (fp32 b1 1 thread: 1.15x at 8, 2.63x at 16; INT8: 4.18x at 8, below INT8 of the original alone,
5.22x at 32). Through the pipeline ``auto`` chose 16 (fp32) and 32 (INT8); the compress stage took 71 s (fp32) and
85 s (INT8) instead of 1.3-1.8 s with a fixed K: ~14 s building the 6 candidates, the rest ONNX export (7-16 s per
graph on this machine), INT8 quantisation and timing.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import PruningError

__all__ = ["AUTO", "DEFAULT_CANDIDATES", "UNTIMED", "AlignmentChoice", "Built", "Candidate", "Measure", "OnnxLatency",
           "candidate_alignments", "choose_alignment", "time_graphs"]

AUTO = "auto"
DEFAULT_CANDIDATES = (1, 2, 4, 8, 16, 32)
#: The alignment ``auto`` uses when nothing is timed (a run without ``--bench-batch``): the previous fixed default.
UNTIMED = 8
#: Images used to calibrate the INT8 graphs that are only timed (latency does not depend on the ranges).
TIMING_CALIB_IMAGES = 32

#: Latency (p50, ms) of each candidate model, keyed like its input; all timed in one run.
Measure = Callable[[Mapping[int, nn.Module]], Mapping[int, float]]


@dataclass(frozen=True)
class Built:
    """A candidate pruned at one alignment: the model, the fraction of the target metric it removes, its MACs (one
    image), ``key`` (equal keys = identical graphs, timed once; None: always timed) and ``result``, whatever the
    builder wants back if this candidate wins (e.g. the method's full result)."""

    model: nn.Module
    achieved: float
    macs: int
    key: Hashable | None = None
    result: Any = None


@dataclass(frozen=True)
class Candidate:
    """One alignment tried: ``met`` False when the target could not be met at it (nothing else measured then)."""

    round_to: int
    met: bool
    p50_ms: float | None = None
    macs: int | None = None
    achieved: float | None = None

    def row(self) -> dict[str, Any]:
        """JSON-friendly row for the report."""
        p50 = None if self.p50_ms is None else round(self.p50_ms, 5)
        achieved = None if self.achieved is None else round(self.achieved, 4)
        return {"round_to": self.round_to, "met": self.met, "p50_ms": p50, "macs": self.macs, "achieved": achieved}


@dataclass(frozen=True)
class AlignmentChoice:
    """What :func:`choose_alignment` found: the fastest candidate that met the target (``chosen``, its
    :class:`Built` in ``built``), every candidate tried, and the seconds spent building and measuring."""

    chosen: int
    built: Built
    candidates: tuple[Candidate, ...]
    seconds: dict[str, float] = field(default_factory=dict)

    def section(self, **how: Any) -> dict[str, Any]:
        """The report's ``alignment`` section; ``how`` says what was timed (graph, batch, threads)."""
        return {"chosen": self.chosen, "candidates": [c.row() for c in self.candidates], **how,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def candidate_alignments(widths: Iterable[int], candidates: Sequence[int] = DEFAULT_CANDIDATES) -> tuple[int, ...]:
    """The ``candidates`` that make sense for groups of ``widths`` channels: those below the widest group (an
    alignment at or above every group's width can prune nothing); 1 always stays.

    >>> candidate_alignments([16, 32, 64])
    (1, 2, 4, 8, 16, 32)
    >>> candidate_alignments([8, 16])
    (1, 2, 4, 8)
    """
    widest = max(widths, default=1)
    kept = tuple(sorted({int(k) for k in candidates if int(k) == 1 or int(k) < widest}))
    return kept or (1,)


def choose_alignment(candidates: Sequence[int], build: Callable[[int], Built | None],
                     measure: Measure) -> AlignmentChoice:
    """Build the pruned model at each alignment of ``candidates`` (``build(k)``: None when the target cannot be met
    at ``k``), time every model that was built with one call of ``measure``, and return the fastest (lowest p50;
    ties: the earlier candidate) with every candidate's latency, MACs and achieved fraction.

    Raises :class:`~compressor.errors.PruningError` when no candidate met the target.

    >>> choice = choose_alignment([1, 8], build, measure)  # doctest: +SKIP
    >>> choice.chosen, [c.p50_ms for c in choice.candidates]  # doctest: +SKIP
    (8, [1.48, 1.36])
    """
    if not candidates:
        raise PruningError("no candidate alignment to try")
    start = time.perf_counter()
    built = {int(k): build(int(k)) for k in candidates}
    ready = {k: b for k, b in built.items() if b is not None}
    if not ready:
        raise PruningError(f"the target cannot be met at any alignment of {', '.join(map(str, built))}")
    timed = time.perf_counter()
    first: dict[Any, int] = {}  # one model per distinct graph
    for k, b in ready.items():
        first.setdefault(b.key if b.key is not None else ("candidate", k), k)
    latency = measure({k: ready[k].model for k in first.values()})
    p50 = {k: float(latency[first[b.key if b.key is not None else ("candidate", k)]]) for k, b in ready.items()}
    done = time.perf_counter()
    rows = tuple(Candidate(k, False) if b is None else Candidate(k, True, p50[k], int(b.macs), float(b.achieved))
                 for k, b in built.items())
    chosen = min(ready, key=lambda k: (p50[k], list(built).index(k)))
    return AlignmentChoice(chosen, ready[chosen], rows, {"build": timed - start, "measure": done - timed})


def time_graphs(paths: Mapping[str, Path], *, input_shape: Sequence[int], batch: int, threads: int | None,
                repeats: int, seed: int) -> dict[str, float]:
    """p50 latency (ms) of each ONNX graph of ``paths`` at ``batch``, all interleaved in one
    :func:`exporters.benchmark_latency` run (onnxruntime ``threads``; None: its default)."""
    from exporters import benchmark_latency

    result = benchmark_latency({k: str(p) for k, p in paths.items()}, input_shape=tuple(input_shape),
                               batch_sizes=(batch,), threads=threads, repeats=repeats, seed=seed)
    return {name: stats.p50_ms for name, stats in result.latency[batch].items()}


def _timing_calib(batches: Sequence[np.ndarray], images: int = TIMING_CALIB_IMAGES) -> list[np.ndarray]:
    """The first ``images`` calibration images, as one batch."""
    return [np.concatenate([np.asarray(b, dtype=np.float32) for b in batches])[:images]]


@dataclass(frozen=True)
class OnnxLatency:
    """The real :data:`Measure`: each candidate exported to ONNX, quantised to INT8 when ``calib`` (float32 NCHW
    batches, normalised) is given, then all timed interleaved by :func:`time_graphs` at ``batch`` on ``threads``.

    INT8 uses :data:`compressor.quantize.DEFAULT_FORMAT` (U8 activations, S8 per-channel weights: the format the run's
    INT8 stage measured fastest on x86; that stage still times U8 against S8 for the shipped graph) calibrated on
    the first :data:`TIMING_CALIB_IMAGES` images: latency depends on the graph, not on the calibrated ranges.

    ``reference``: a model timed in many calls (the original, beside each ``--target-latency`` probe) is exported and
    quantised once, on its first call, and its graph reused while this object lives (identity, not equality: it must
    not change in between).
    """

    example: torch.Tensor
    batch: int = 1
    threads: int | None = None
    calib: Sequence[np.ndarray] | None = None
    repeats: int = 50
    seed: int = 0
    reference: nn.Module | None = None
    _kept: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def graph(self) -> str:
        """``"int8"`` or ``"fp32"``: the graph that is timed (the one the run ships)."""
        return "fp32" if self.calib is None else "int8"

    def describe(self) -> dict[str, Any]:
        """How candidates are timed, for the report."""
        return {"graph": self.graph, "batch": self.batch, "threads": self.threads, "repeats": self.repeats}

    def _graph(self, model: nn.Module, folder: Path, stem: str, calib: list[np.ndarray] | None) -> Path:
        """``model`` exported (and quantised with ``calib``) into ``folder``; returns the graph to time."""
        from exporters import export_onnx

        from .quantize import quantize_int8

        fp32 = folder / f"{stem}.onnx"
        export_onnx(copy.deepcopy(model).cpu().eval(), fp32, self.example.cpu())
        return fp32 if calib is None else quantize_int8(fp32, fp32.with_name(f"{stem}.int8.onnx"), calib)

    def _reference_graph(self, calib: list[np.ndarray] | None) -> Path:
        assert self.reference is not None
        if "path" not in self._kept:
            self._kept["dir"] = tempfile.TemporaryDirectory(prefix="compressor-reference-")  # removed with self
            self._kept["path"] = self._graph(self.reference, Path(self._kept["dir"].name), "reference", calib)
        return Path(self._kept["path"])

    def __call__(self, models: Mapping[int, nn.Module]) -> dict[int, float]:
        calib = _timing_calib(self.calib) if self.calib is not None else None
        with tempfile.TemporaryDirectory(prefix="compressor-widths-") as tmp:
            paths = {f"round_to={k}": (self._reference_graph(calib) if self.reference is not None
                                       and model is self.reference else self._graph(model, Path(tmp), f"round_to_{k}",
                                                                                   calib))
                     for k, model in models.items()}
            p50 = time_graphs(paths, input_shape=tuple(self.example.shape[1:]), batch=self.batch,
                              threads=self.threads, repeats=self.repeats, seed=self.seed)
        return {k: p50[f"round_to={k}"] for k in models}
