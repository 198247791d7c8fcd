"""onnxruntime sessions: the lazy, conflict-checked import, provider selection, and session creation with the
providers read back.

onnxruntime is optional (``cpu`` / ``gpu`` extras) and imported only when a session is needed. :mod:`exporters.onnx`
(parity) and :mod:`exporters.benchmark` build their sessions through :func:`create_session`.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from exporters.errors import ExportError, RuntimeConflictError, RuntimeMissingError

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "DEVICES",
    "create_session",
    "describe_error",
    "import_onnxruntime",
    "make_session",
    "providers_for",
    "runtime_info",
    "single_input_name",
]

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("cpu", "cuda", "auto")
# Distributions that all ship the same ``onnxruntime`` import package; two at once overwrite each other's files.
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


def make_session(path: str | os.PathLike[str], *, device: str = "cpu", threads: int | None = None) -> Any:
    """Create an ``onnxruntime.InferenceSession`` with full graph optimisation.

    Parameters
    ----------
    path : path-like
        ONNX file.
    device : {"cpu", "cuda", "auto"}
        ``"cuda"`` requires the CUDA provider to be *active* after loading; ``"auto"`` uses CUDA when onnxruntime
        offers it and quietly accepts CPU (with a log warning) when it falls back.
    threads : int, optional
        ``intra_op_num_threads``; ``None`` keeps onnxruntime's default (one per physical core).

    Returns
    -------
    onnxruntime.InferenceSession
        Check ``session.get_providers()`` for what actually runs.

    Raises
    ------
    RuntimeMissingError, RuntimeConflictError
        onnxruntime is absent, or several of its distributions are installed.
    ExportError
        Bad arguments, the file cannot be loaded, or CUDA was requested but is unavailable or inactive.
    """
    ort = import_onnxruntime()
    providers = providers_for(device, ort.get_available_providers())
    required = (CUDA_PROVIDER,) if device == "cuda" else ()
    return create_session(ort, Path(path), providers, threads=threads, required=required)


def runtime_info() -> dict[str, Any]:
    """onnxruntime version, available providers and installed distributions (never raises).

    Returns
    -------
    dict
        ``onnxruntime_version`` (str or None), ``available_providers`` (list), ``packages`` (distribution name ->
        version, for every onnxruntime distribution found) and ``conflict`` (more than one distribution).
    """
    packages = {name: found for name in _ORT_DISTRIBUTIONS if (found := _dist_version(name)) is not None}
    try:
        ort = importlib.import_module("onnxruntime")
        version: str | None = str(ort.__version__)
        available = list(ort.get_available_providers())
    except Exception:  # missing or broken install: report what is known rather than fail a report
        version, available = None, []
    return {
        "onnxruntime_version": version,
        "available_providers": available,
        "packages": packages,
        "conflict": len(packages) > 1,
    }


def import_onnxruntime() -> Any:
    """Import onnxruntime lazily after checking that only one of its distributions is installed."""
    installed = tuple(name for name in _ORT_DISTRIBUTIONS if _dist_version(name) is not None)
    if len(installed) > 1:
        raise RuntimeConflictError(installed)
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "onnxruntime":
            raise RuntimeMissingError() from exc
        raise ExportError(f"onnxruntime is installed but fails to import ({exc}); reinstall it.") from exc


def _dist_version(name: str) -> str | None:
    """Installed version of distribution ``name`` or None (the seam tests monkeypatch)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def providers_for(device: str, available: Sequence[str]) -> tuple[str, ...]:
    """Provider list to request for ``device`` given onnxruntime's available providers."""
    if device not in DEVICES:
        raise ExportError(f"device must be one of {', '.join(DEVICES)}; got {device!r}.")
    if device == "cpu" or (device == "auto" and CUDA_PROVIDER not in available):
        return (CPU_PROVIDER,)
    if CUDA_PROVIDER not in available:
        raise ExportError(
            f"device 'cuda' requested but this onnxruntime offers only {', '.join(available)}; "
            'install the GPU build (pip uninstall -y onnxruntime; pip install "compressor[gpu]") or use device="cpu".'
        )
    return (CUDA_PROVIDER, CPU_PROVIDER)


def create_session(
    ort: Any,
    path: Path,
    providers: Sequence[str],
    *,
    threads: int | None,
    required: Sequence[str] = (),
    config: Mapping[str, str] | None = None,
) -> Any:
    """Build a session (ORT_ENABLE_ALL) and check the providers it actually activated against ``required``."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ExportError(f"threads must be a positive int or None, got {threads!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {path}: {describe_error(exc)}") from exc
    active = list(session.get_providers())
    missing = [p for p in required if p not in active]
    if missing:
        raise ExportError(
            f"{', '.join(missing)} requested but the session runs on {', '.join(active)} (onnxruntime "
            f"{ort.__version__} fell back silently); check that the installed CUDA/cuDNN match onnxruntime-gpu."
        )
    if CUDA_PROVIDER in providers and CUDA_PROVIDER not in active:
        logger.warning("onnxruntime could not activate CUDA for %s; running on %s.", path, ", ".join(active))
    return session


def single_input_name(session: Any) -> str:
    """Name of the session's only input; several inputs are not supported."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ExportError(f"the ONNX graph has {len(inputs)} inputs ({[i.name for i in inputs]}); expected one.")
    return str(inputs[0].name)


def describe_error(exc: BaseException) -> str:
    """One line naming the root cause: follow explicit ``raise ... from`` links, keep the first message line."""
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    message = lines[0] if lines else "(no message)"
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(root).__name__}: {message}"
