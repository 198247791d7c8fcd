"""Export a PyTorch CNN to ONNX, check it against PyTorch, and benchmark it with onnxruntime.

This package never imports ``compressor``; onnxruntime is optional (``pip install "compressor[cpu]"`` or ``[gpu]``)
and imported only when a session is needed.
"""

from exporters.benchmark import BenchmarkResult as BenchmarkResult
from exporters.benchmark import LatencyStats as LatencyStats
from exporters.benchmark import benchmark_latency as benchmark_latency
from exporters.errors import ExportError as ExportError
from exporters.errors import ParityError as ParityError
from exporters.errors import RuntimeConflictError as RuntimeConflictError
from exporters.errors import RuntimeMissingError as RuntimeMissingError
from exporters.onnx import ParityReport as ParityReport
from exporters.onnx import check_parity as check_parity
from exporters.onnx import export_onnx as export_onnx
from exporters.runtime import make_session as make_session
from exporters.runtime import runtime_info as runtime_info

__all__ = [
    "BenchmarkResult",
    "ExportError",
    "LatencyStats",
    "ParityError",
    "ParityReport",
    "RuntimeConflictError",
    "RuntimeMissingError",
    "benchmark_latency",
    "check_parity",
    "export_onnx",
    "make_session",
    "runtime_info",
]
