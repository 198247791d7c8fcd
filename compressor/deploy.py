"""Deployment stages: export both models to ONNX, verify the compressed one against PyTorch, benchmark both.

Public stages of the pipeline (:mod:`compressor.pipeline` holds the earlier ones); the INT8 stage of the deployment
issue lands here. Nothing here writes to the user's output folder: files go to a staging folder that
:func:`compressor.api.compress` publishes only when every stage succeeded.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ValidationError
from .threads import ThreadPolicy


def check_runtime() -> None:
    """onnxruntime must be importable, and only one of onnxruntime / onnxruntime-gpu installed (they clash)."""
    import exporters
    from exporters.errors import RuntimeConflictError, RuntimeMissingError

    info = exporters.runtime_info()
    if info["conflict"]:
        raise RuntimeConflictError(tuple(info["packages"]))
    if info["onnxruntime_version"] is None:
        raise RuntimeMissingError()


@dataclass(frozen=True)
class Exported:
    """Stage 6: the ONNX files (``original``, ``compressed``), their sizes and the parity of the compressed one."""

    paths: dict[str, Path]
    parity: dict[str, Any]
    seconds: dict[str, float]  # "export", "parity"

    def onnx_bytes(self) -> dict[str, int]:
        return {name: path.stat().st_size for name, path in self.paths.items()}

    def deflated_bytes(self) -> dict[str, int]:
        """Each file's size after deflate (``zlib``, level 6, the default of zip and gzip): what zeros from
        unstructured pruning save on disk or over the wire, where the raw ``onnx_bytes`` stay those of the dense
        graph."""
        return {name: len(zlib.compress(path.read_bytes(), 6)) for name, path in self.paths.items()}


def export_verify(models: dict[str, nn.Module], example: torch.Tensor, inputs: list[torch.Tensor], *,
                  folder: Path, atol: float, threads: int | None = None) -> Exported:
    """Export every model to ``folder/<name>.onnx``; check ``compressed`` against PyTorch on ``inputs``.

    A parity failure raises :class:`ValidationError` (never emit a broken model).
    """
    from exporters import check_parity, export_onnx

    paths = {name: folder / f"{name}.onnx" for name in models}
    with ThreadPolicy(threads).apply("export"):
        start = time.perf_counter()
        for name, model in models.items():
            export_onnx(model.cpu().eval(), paths[name], example)
        exported = time.perf_counter()
        parity = check_parity(models["compressed"], paths["compressed"], inputs, atol=atol)
    seconds = {"export": round(exported - start, 4), "parity": round(time.perf_counter() - exported, 4)}
    if not parity.ok:
        raise ValidationError(
            f"the compressed model's ONNX export disagrees with PyTorch ({parity.describe()}); nothing was "
            "written. Re-run with --debug and report it, or loosen --atol if the difference is benign"
        )
    return Exported(paths, parity.to_dict(), seconds)


@dataclass(frozen=True)
class Benchmarked:
    """Stage 7: onnxruntime latency per batch size (``original``/``compressed`` stats and ``speedup``), and how it
    was measured (providers read back from the session, threads, versions)."""

    latency: dict[str, Any]
    details: dict[str, Any]


def _rounded(stats: Any) -> dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(stats).items()}


def benchmark(paths: dict[str, Path], example: torch.Tensor, *, batches: tuple[int, ...], threads: int | None,
              device: str, repeats: int, seed: int) -> Benchmarked:
    """Stage 8: time every graph of ``paths`` interleaved in one onnxruntime run.

    Per batch size: each graph's stats, ``speedup`` (fp32 original p50 / fp32 compressed p50), ``speedups`` (fp32
    original p50 / each graph's p50) and, with INT8 graphs, ``int8_gain`` (INT8 original / INT8 compressed: what
    compression adds on top of quantising the original, the alternative a user would otherwise ship).
    """
    from exporters import benchmark_latency

    bench = benchmark_latency({k: str(p) for k, p in paths.items()}, input_shape=tuple(example.shape[1:]),
                              batch_sizes=batches, threads=ThreadPolicy(threads).onnxruntime(), device=device,
                              repeats=repeats, seed=seed)
    latency: dict[str, Any] = {}
    for b in batches:
        row: dict[str, Any] = {name: _rounded(bench.latency[b][name]) for name in paths}
        row["speedup"] = round(bench.speedup(b, "original", "compressed"), 4)
        row["speedups"] = {name: round(bench.speedup(b, "original", name), 4) for name in paths if name != "original"}
        if INT8_NAMES[1] in paths:
            row["int8_gain"] = round(bench.speedup(b, *INT8_NAMES), 4)
        latency[str(b)] = row
    return Benchmarked(latency, {k: v for k, v in bench.to_dict().items() if k != "latency"})


INT8_NAMES = ("original.int8", "compressed.int8")


@dataclass(frozen=True)
class Quantized:
    """Stage 7: INT8 graphs of both models (``original.int8``: the baseline a user would otherwise ship), the format
    chosen by measurement on this machine, each graph's check (top-1, agreement with fp32, nodes kept float), and,
    with ``--quantize auto``, the one-line reason for a graph that failed its check (it is not shipped)."""

    paths: dict[str, Path]
    results: dict[str, Any]
    fmt: Any
    choice: dict[str, Any]
    seconds: float
    failures: dict[str, str]

    def section(self) -> dict[str, Any]:
        """The report's ``int8`` section: ``format``, ``format_choice`` and one entry per side."""
        graphs: dict[str, Any] = {}
        for name in INT8_NAMES:
            side = name.split(".")[0]
            if name in self.failures:
                graphs[side] = {"failed": self.failures[name], "onnx_bytes": None, "accuracy": None}
                continue
            result = self.results[name]
            graphs[side] = {
                "onnx_bytes": self.paths[name].stat().st_size, "accuracy": result.accuracy,
                "fp32_accuracy": result.fp32_accuracy, "agreement": round(result.agreement, 4),
                "excluded": list(result.excluded), "attempts": result.attempts, "seconds": round(result.seconds, 3)}
        return {"format": {"name": self.fmt.name, **self.fmt.to_dict()}, "format_choice": self.choice,
                "seconds": round(self.seconds, 3), **graphs}


def quantize(exported: Exported, calib: list[np.ndarray], eval_batches: list[tuple[np.ndarray, np.ndarray]] | None,
             *, max_drop: float, threads: int | None, required: bool) -> Quantized:
    """Stage 7: choose the INT8 format by timing U8 and S8 activations on this machine, then quantise the original
    and the compressed graph the same way (onnxruntime's ``quantize_static``, QDQ, per-channel), each verified
    against its own fp32 ONNX graph's top-1 (like with like) with ``max_drop`` (fraction) and sensitive nodes kept
    float when needed. A graph that still fails raises (``required``, i.e. ``--quantize int8``) or is left out and
    reported (``--quantize auto``): an INT8 graph that fails its check is never shipped."""
    from .quantize import choose_format, quantize_verified

    start = time.perf_counter()
    fmt, choice = choose_format(exported.paths["original"], calib, batch=1, threads=ThreadPolicy(threads).onnxruntime())
    paths, results, failures = {}, {}, {}
    for name in INT8_NAMES:
        fp32 = exported.paths[name.split(".")[0]]
        try:
            results[name] = quantize_verified(fp32, fp32.with_name(f"{name}.onnx"), calib=calib,
                                              eval_batches=eval_batches, fmt=fmt, max_drop=max_drop)
        except ValidationError as exc:
            if required:
                raise
            failures[name] = str(exc)
            continue
        paths[name] = results[name].path
    return Quantized(paths, results, fmt, choice, time.perf_counter() - start, failures)
