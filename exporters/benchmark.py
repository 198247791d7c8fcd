"""Interleaved onnxruntime latency benchmark.

Models are timed in turns (A, B, A, B, ...) rather than one after the other, so that slow drifts in machine load
(other jobs, thermal throttling, frequency scaling) hit every model equally and the *ratio* of their latencies
stays meaningful on a shared machine. Only ``session.run`` sits inside the timed region: the inputs are random
float32 arrays created once per batch size, and nothing is printed or written while timing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import ExportError
from exporters.runtime import CUDA_PROVIDER, create_session, import_onnxruntime, providers_for, single_input_name

__all__ = ["BenchmarkResult", "LatencyStats", "benchmark_latency"]

# Idle intra-op threads of the session just timed would otherwise spin-wait and steal cores from the next one.
_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at one batch size.

    Attributes
    ----------
    p50_ms, p90_ms, p99_ms : float
        Percentiles of the per-call latency (linear interpolation), in milliseconds.
    mean_ms, std_ms : float
        Mean and sample standard deviation (``ddof=1``; 0 for a single call), in milliseconds.
    n : int
        Number of timed calls.
    throughput_ips : float
        Images per second, ``batch_size / mean`` (total images over total time in ``session.run``).
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    n: int
    throughput_ips: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float], *, batch_size: int) -> LatencyStats:
        """Summarise per-call durations in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ExportError("no timings to summarise; repeats must be at least 1.")
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if ms.size > 1 else 0.0
        return cls(p50, p90, p99, mean, std, int(ms.size), batch_size * 1e3 / mean if mean > 0 else float("inf"))

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class BenchmarkResult:
    """Latencies of several ONNX models under identical conditions.

    Attributes
    ----------
    latency : dict
        ``latency[batch_size][model_name]`` -> :class:`LatencyStats`.
    providers : dict
        Model name -> providers its sessions actually used (read back from onnxruntime).
    threads : int or None
        ``intra_op_num_threads`` requested; None means onnxruntime's default (one per physical core).
    onnxruntime_version : str
    device : str
        ``"cuda"`` when the sessions ran on the CUDA provider, else ``"cpu"``.
    """

    latency: dict[int, dict[str, LatencyStats]]
    providers: dict[str, list[str]]
    threads: int | None
    onnxruntime_version: str
    device: str

    def speedup(self, batch: int, baseline: str, other: str) -> float:
        """``p50(baseline) / p50(other)`` at ``batch``: above 1 means ``other`` is faster."""
        if batch not in self.latency:
            raise ExportError(f"no timings for batch {batch}; measured: {sorted(self.latency)}.")
        row = self.latency[batch]
        for name in (baseline, other):
            if name not in row:
                raise ExportError(f"no model named {name!r}; measured: {', '.join(row)}.")
        return row[baseline].p50_ms / row[other].p50_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (string batch keys, plain numbers)."""
        return {
            "device": self.device,
            "threads": self.threads,
            "onnxruntime_version": self.onnxruntime_version,
            "providers": {name: list(p) for name, p in self.providers.items()},
            "session_config": {"graph_optimization_level": "ORT_ENABLE_ALL", **_SESSION_CONFIG},
            "latency": {
                str(batch): {name: stats.to_dict() for name, stats in row.items()}
                for batch, row in self.latency.items()
            },
        }


def benchmark_latency(
    models: Mapping[str, str | os.PathLike[str]],
    *,
    input_shape: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 30,
    min_time_s: float | None = None,
    seed: int = 0,
) -> BenchmarkResult:
    """Time ``session.run`` of each ONNX model, interleaved, at each batch size.

    Parameters
    ----------
    models : mapping of str to path-like
        Model name -> ONNX file (one float32 input each, same per-sample shape).
    input_shape : sequence of int, optional
        Per-sample shape without the batch axis, e.g. ``(3, 32, 32)``; read from the first model when None.
    batch_sizes : sequence of int
        Batch sizes to measure (the graphs need a dynamic batch axis for sizes other than their fixed one).
    threads : int, optional
        ``intra_op_num_threads`` for every session.
    device : {"cpu", "cuda", "auto"}
        As in :func:`exporters.make_session`.
    warmup : int
        Untimed runs per model and batch size before timing.
    repeats : int
        Timed rounds; each round runs every model once.
    min_time_s : float, optional
        Keep adding rounds until this many seconds have elapsed (at least ``repeats`` rounds either way).
    seed : int
        Seed of the random inputs.

    Returns
    -------
    BenchmarkResult

    Notes
    -----
    Sessions use ``ORT_ENABLE_ALL`` and ``session.intra_op.allow_spinning=0``, so that threads left spinning by one
    model do not slow the next one in the interleaved loop; absolute latencies with spinning on may be slightly
    lower at batch 1. On CUDA, ``session.run`` takes and returns host arrays, so timings include the copies.
    """
    _check_benchmark_args(models, batch_sizes, warmup=warmup, repeats=repeats, min_time_s=min_time_s)
    ort = import_onnxruntime()
    providers = providers_for(device, ort.get_available_providers())
    required = (CUDA_PROVIDER,) if device == "cuda" else ()
    rng = np.random.default_rng(seed)
    latency: dict[int, dict[str, LatencyStats]] = {}
    read_back: dict[str, list[str]] = {}
    for batch in batch_sizes:
        sessions = {
            name: create_session(
                ort, Path(path), providers, threads=threads, required=required, config=_SESSION_CONFIG
            )
            for name, path in models.items()
        }
        shape = _sample_shape(sessions, input_shape, batch)
        data = rng.standard_normal((batch, *shape), dtype=np.float32)
        runs = [(name, session, {single_input_name(session): data}) for name, session in sessions.items()]
        seconds = _time_interleaved(runs, warmup=warmup, repeats=repeats, min_time_s=min_time_s)
        latency[batch] = {name: LatencyStats.from_seconds(s, batch_size=batch) for name, s in seconds.items()}
        for name, session in sessions.items():
            read_back.setdefault(name, list(session.get_providers()))
        del sessions, runs
    on_cuda = {CUDA_PROVIDER in p for p in read_back.values()}
    if len(on_cuda) > 1:
        raise ExportError(f"the models ran on different providers ({read_back}); timings are not comparable.")
    return BenchmarkResult(
        latency=latency,
        providers=read_back,
        threads=threads,
        onnxruntime_version=str(ort.__version__),
        device="cuda" if on_cuda == {True} else "cpu",
    )


def _time_interleaved(
    runs: Sequence[tuple[str, Any, dict[str, np.ndarray]]],
    *,
    warmup: int,
    repeats: int,
    min_time_s: float | None,
) -> dict[str, list[float]]:
    """Warm every session up, then time rounds of one ``session.run`` per model; durations in seconds."""
    for _, session, feed in runs:
        for _ in range(warmup):
            session.run(None, feed)
    samples: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    slots = [(session, feed, samples[name]) for name, session, feed in runs]
    clock = time.perf_counter
    start, rounds = clock(), 0
    while rounds < repeats or (min_time_s is not None and clock() - start < min_time_s):
        for session, feed, out in slots:
            t0 = clock()
            session.run(None, feed)
            t1 = clock()
            out.append(t1 - t0)
        rounds += 1
    return samples


def _sample_shape(sessions: Mapping[str, Any], input_shape: Sequence[int] | None, batch: int) -> tuple[int, ...]:
    """Per-sample input shape, checked against every session's declared input (type, rank, static dims)."""
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    for name, session in sessions.items():
        single_input_name(session)
        declared = session.get_inputs()[0]
        if declared.type != "tensor(float)":
            raise ExportError(f"model {name!r} takes {declared.type}; the benchmark feeds float32 inputs.")
        dims = list(declared.shape)
        if shape is None:
            if not all(isinstance(d, int) for d in dims[1:]):
                raise ExportError(f"model {name!r} has symbolic non-batch input dims {dims}; pass input_shape.")
            shape = tuple(int(d) for d in dims[1:])
        if len(dims) != len(shape) + 1:
            raise ExportError(f"model {name!r} expects input dims {dims}, but input_shape is {shape}.")
        if isinstance(dims[0], int) and dims[0] != batch:
            raise ExportError(
                f"model {name!r} has a fixed batch of {dims[0]}, cannot run batch {batch}; "
                "re-export it with dynamic_batch=True."
            )
        for want, have in zip(shape, dims[1:]):
            if isinstance(have, int) and have != want:
                raise ExportError(f"model {name!r} expects input dims {dims}, but input_shape is {shape}.")
    if shape is None:
        raise ExportError("no models to benchmark.")
    return shape


def _check_benchmark_args(
    models: Mapping[str, object],
    batch_sizes: Sequence[int],
    *,
    warmup: int,
    repeats: int,
    min_time_s: float | None,
) -> None:
    if not isinstance(models, Mapping) or not models:
        raise ExportError("models must be a non-empty mapping of name -> ONNX path.")
    for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ExportError(f"{name} must be an int >= {minimum}, got {value!r}.")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ExportError(f"batch_sizes must be positive ints, got {batch_sizes!r}.")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ExportError(f"batch_sizes has duplicates: {list(batch_sizes)}.")
    if min_time_s is not None and not (isinstance(min_time_s, (int, float)) and min_time_s > 0):
        raise ExportError(f"min_time_s must be a positive number or None, got {min_time_s!r}.")
