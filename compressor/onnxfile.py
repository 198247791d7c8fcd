"""Reading a user's ONNX file: one place for the checks and their one-line errors (``bench``, ``quantize``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import InputError


def read_onnx(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    """``(path, onnx.ModelProto)`` of an existing ONNX file (external data not loaded), else a one-line
    :class:`~compressor.errors.InputError`: missing, not a file, not ONNX, or no graph.

    >>> read_onnx("runs/r56-l1/compressed.onnx")[1].graph.input[0].name  # doctest: +SKIP
    'input'
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}" if not path.exists() else f"not a file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning, ... on non-ONNX bytes
        raise InputError(f"{path} is not an ONNX model ({type(exc).__name__})") from None
    if proto.ir_version < 1 or not proto.graph.node:
        raise InputError(f"{path} is not an ONNX model (no graph)")
    return path, proto


def graph_inputs(proto: Any) -> list[Any]:
    """The graph's real inputs (initialisers listed as inputs by old exporters left out)."""
    weights = {init.name for init in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in weights]
