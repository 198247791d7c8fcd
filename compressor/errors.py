"""Error types the CLI can sort.

Every error a user can fix by changing their input is a :class:`CompressorError`. The CLI prints its message as one
line on stderr and exits with code 2; anything else is a bug, exits 1 and keeps its traceback under ``--debug``.
All subclasses also inherit :class:`ValueError` so plain ``except ValueError`` callers keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CompressorError(ValueError):
    """Base class: bad input or an unmet request, with a message that says what to do next."""


class InputError(CompressorError):
    """A command-line argument or API parameter is invalid (e.g. ``target`` outside (0, 1))."""


class ModelLoadError(CompressorError):
    """The model file cannot be read, is not a checkpoint, or does not match the architecture."""


class DataError(CompressorError):
    """The data cannot be read, is empty, or does not fit the model (shape, channels, label range)."""


class UnknownNameError(CompressorError):
    """An unknown architecture, method, normalisation, ... name."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")
        self.kind, self.name, self.known = kind, name, known


class PruningError(CompressorError):
    """A layer group cannot be pruned safely, or the target cannot be met."""


class ValidationError(CompressorError):
    """The compressed model failed validation (forward pass, output shape, ONNX parity); nothing was written."""


class OutputError(CompressorError):
    """The output location cannot be written."""
