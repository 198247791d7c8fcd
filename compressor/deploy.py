"""Deployment stages: export both models to ONNX, verify the compressed one against PyTorch, benchmark both.

Public stages of the pipeline (:mod:`compressor.pipeline` holds the earlier ones); the INT8 stage of the deployment
issue lands here. Nothing here writes to the user's output folder: files go to a staging folder that
:func:`compressor.api.compress` publishes only when every stage succeeded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
            f"the compressed model's ONNX export disagrees with PyTorch (max abs diff {parity.max_abs_diff:.3g} "
            f"> atol {atol:g} or top-1 agreement {100 * parity.top1_agreement:.1f}% < 100%); nothing was "
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
    """Stage 7: time ``original`` and ``compressed`` interleaved in one onnxruntime run."""
    from exporters import benchmark_latency

    bench = benchmark_latency({k: str(p) for k, p in paths.items()}, input_shape=tuple(example.shape[1:]),
                              batch_sizes=batches, threads=ThreadPolicy(threads).onnxruntime(), device=device,
                              repeats=repeats, seed=seed)
    latency = {str(b): {"original": _rounded(bench.latency[b]["original"]),
                        "compressed": _rounded(bench.latency[b]["compressed"]),
                        "speedup": round(bench.speedup(b, "original", "compressed"), 4)} for b in batches}
    return Benchmarked(latency, {k: v for k, v in bench.to_dict().items() if k != "latency"})
