"""Error types raised by :mod:`exporters`.

Every error a user can act on is an :class:`ExportError`. Like ``compressor.errors.CompressorError`` it subclasses
:class:`ValueError`, so the CLI can print its one-line message and exit 2 without ``exporters`` importing
``compressor``. The underlying exception (torch, onnx, onnxruntime) is always chained as ``__cause__`` so that
``--debug`` still shows the full traceback.
"""

from __future__ import annotations

__all__ = ["ExportError", "ParityError", "RuntimeConflictError", "RuntimeMissingError"]


class ExportError(ValueError):
    """Base class: the ONNX export, its validation or an onnxruntime session failed; the message says what to do."""


class ParityError(ExportError):
    """ONNX and PyTorch disagree: output names or shapes differ, values exceed ``atol``, or top-1 labels differ.

    Name and shape mismatches are raised directly by :func:`exporters.check_parity` (they are fatal); value
    differences are reported in a :class:`exporters.ParityReport` and raised only by
    :meth:`~exporters.ParityReport.raise_if_failed`, so a caller may turn them into a warning instead.
    """


class RuntimeMissingError(ExportError):
    """onnxruntime is not installed; it comes from the ``cpu`` or ``gpu`` extra."""

    def __init__(self, detail: str = "") -> None:
        suffix = f" ({detail})" if detail else ""
        super().__init__(
            f"onnxruntime is not installed{suffix}; install it with "
            'pip install "compressor[cpu]" (or "compressor[gpu]" for CUDA).'
        )


class RuntimeConflictError(ExportError):
    """Several onnxruntime distributions are installed; they ship the same ``onnxruntime`` package and overwrite
    each other's files, which breaks imports or silently drops the CUDA provider."""

    def __init__(self, distributions: tuple[str, ...]) -> None:
        names = " ".join(distributions)
        super().__init__(
            f"conflicting onnxruntime distributions installed ({', '.join(distributions)}) that overwrite each "
            f"other's files; run `pip uninstall -y {names}` and then install one: "
            'pip install "compressor[cpu]" or pip install "compressor[gpu]".'
        )
        self.distributions = distributions
