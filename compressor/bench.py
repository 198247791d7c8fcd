"""onnxruntime latency of any ONNX graphs, compared in one interleaved run.

:func:`bench_onnx` reads the per-image input shape from the graphs themselves, checks that they agree, and times
them with :func:`exporters.benchmark_latency` (models in turns A, B, A, B, ... so that load drifts on a shared
machine hit all of them alike). Speed-ups are ``p50(first) / p50(other)``: above 1 means faster than the first graph.
:func:`render_bench` prints the result as a table.

Examples
--------
>>> from compressor.bench import bench_onnx
>>> report = bench_onnx(["runs/r56-l1/original.onnx", "runs/r56-l1/compressed.onnx"],
...                     batch_sizes=(1, 32), repeats=50, device="cpu")  # doctest: +SKIP
>>> report.speedups()[32]["compressed.onnx"]  # doctest: +SKIP
1.31
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporters import BenchmarkResult, benchmark_latency

from .errors import InputError
from .onnxfile import graph_inputs, read_onnx

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["BenchModel", "BenchReport", "bench_onnx", "read_input_shape", "render_bench"]


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked graph.

    Attributes
    ----------
    name : str
        Its key in the latency tables: the file name, or the path as given when two files share a name.
    path : str
        The path as given.
    bytes : int
        File size.
    """

    name: str
    path: str
    bytes: int


@dataclass(frozen=True)
class BenchReport:
    """Latencies of several ONNX graphs measured together.

    Attributes
    ----------
    models : tuple of BenchModel
        In the order given; the first is the baseline of the speed-ups.
    input_shape : tuple of int
        Per-image input shape read from the graphs (without the batch axis).
    result : exporters.BenchmarkResult
        Latency statistics per batch size and model, providers read back from the sessions, threads, device.
    """

    models: tuple[BenchModel, ...]
    input_shape: tuple[int, ...]
    result: BenchmarkResult

    @property
    def baseline(self) -> str:
        """Name of the first graph, against which speed-ups are computed."""
        return self.models[0].name

    def speedups(self) -> dict[int, dict[str, float]]:
        """``{batch: {name: p50(baseline) / p50(name)}}`` (the baseline itself is 1.0).

        >>> report.speedups()  # doctest: +SKIP
        {1: {'original.onnx': 1.0, 'compressed.onnx': 1.2}, 32: {...}}
        """
        return {batch: {m.name: self.result.speedup(batch, self.baseline, m.name) for m in self.models}
                for batch in self.result.latency}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: the benchmark's own fields (``latency`` keyed by batch as a string, ``providers``,
        ``device``, ``threads``, ...) plus ``models``, ``input_shape``, ``baseline`` and ``speedup``."""
        return {
            "models": [{"name": m.name, "path": m.path, "bytes": m.bytes} for m in self.models],
            "input_shape": list(self.input_shape),
            "baseline": self.baseline,
            **self.result.to_dict(),
            "speedup": {str(batch): row for batch, row in self.speedups().items()},
        }


def read_input_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Per-image input shape of an ONNX graph: its single input's dims after the batch axis, which must be fixed.

    Raises :class:`~compressor.errors.InputError` when the file is missing, is not an ONNX model, has several inputs
    or symbolic non-batch dims.

    >>> read_input_shape("runs/r56-l1/compressed.onnx")  # doctest: +SKIP
    (3, 32, 32)
    """
    path, proto = read_onnx(path)
    inputs = graph_inputs(proto)
    if len(inputs) != 1:
        raise InputError(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); bench needs one")
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise InputError(f"{path} takes input dims {dims}; bench needs fixed dims after the batch axis")
    return tuple(int(d) for d in dims[1:])


def _names(paths: Sequence[Path]) -> list[str]:
    """File names where they are unique, else the paths as given; repeats of one path get ``#2``, ``#3``."""
    names = [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}#{seen[name]}"
    return names


def bench_onnx(
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    repeats: int = 50,
    warmup: int = 5,
    device: str = "auto",
    seed: int = 0,
) -> BenchReport:
    """Time ONNX graphs with onnxruntime, interleaved in one run, at each batch size.

    Parameters
    ----------
    paths : sequence of path-like
        One or more ONNX files with one float32 input of the same per-image shape; the first is the baseline.
    batch_sizes : sequence of int
        Batch sizes to time (graphs with a fixed batch axis run only at that size).
    threads : int, optional
        onnxruntime intra-op threads; None keeps onnxruntime's default (one per physical core).
    repeats, warmup : int
        Timed rounds (each runs every graph once) and untimed runs per graph and batch size.
    device : {"auto", "cpu", "cuda"}
        ``auto`` uses CUDA when onnxruntime offers it; the providers actually used are in the result.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    BenchReport

    Raises
    ------
    compressor.errors.InputError
        No paths, a missing or non-ONNX file, or graphs that disagree on the input shape.
    exporters.ExportError
        onnxruntime cannot load a graph, run a batch size, or use the requested device.

    Examples
    --------
    >>> r = bench_onnx(["a.onnx", "b.onnx"], batch_sizes=(1,), repeats=3, device="cpu")  # doctest: +SKIP
    >>> r.result.latency[1]["b.onnx"].p50_ms, r.result.providers["b.onnx"]  # doctest: +SKIP
    (0.41, ['CPUExecutionProvider'])
    """
    files = [Path(p) for p in paths]
    if not files:
        raise InputError("no ONNX files given; e.g. compress bench original.onnx compressed.onnx")
    shapes = [read_input_shape(p) for p in files]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{p} takes {'x'.join(map(str, s))}" for p, s in zip(files, shapes))
        raise InputError(f"the graphs disagree on the input shape ({listed}); bench compares graphs of one input shape")
    models = tuple(BenchModel(name, str(p), p.stat().st_size) for name, p in zip(_names(files), files))
    result = benchmark_latency({m.name: m.path for m in models}, input_shape=shapes[0], batch_sizes=tuple(batch_sizes),
                               threads=threads, device=device, warmup=warmup, repeats=repeats, seed=seed)
    return BenchReport(models, shapes[0], result)


def render_bench(report: BenchReport, *, console: Console | None = None) -> None:
    """Print p50/p90/p99 and the speed-up over the first graph per batch size, then the providers used.

    >>> render_bench(bench_onnx(["a.onnx", "b.onnx"], repeats=3))  # doctest: +SKIP
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    result, speedups = report.result, report.speedups()
    threads = "onnxruntime default" if result.threads is None else str(result.threads)
    table = Table(title=f"onnxruntime latency, input {'x'.join(map(str, report.input_shape))}, {result.device}, "
                        f"threads: {threads}", box=box.SIMPLE_HEAD)
    for col in ("batch", "model", "p50 ms", "p90 ms", "p99 ms", "img/s", f"vs {report.baseline}"):
        table.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
    for batch, row in result.latency.items():
        for i, (name, stats) in enumerate(row.items()):
            table.add_row(str(batch) if i == 0 else "", name, f"{stats.p50_ms:.3f}", f"{stats.p90_ms:.3f}",
                          f"{stats.p99_ms:.3f}", f"{stats.throughput_ips:,.0f}", f"{speedups[batch][name]:.2f}x")
    console.print(table)
    providers = {", ".join(p) for p in result.providers.values()}
    console.print(f"providers: {'; '.join(sorted(providers))} (onnxruntime {result.onnxruntime_version}); "
                  f"{next(iter(result.latency.values()))[report.baseline].n} timed runs per model and batch")
