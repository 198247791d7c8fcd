"""Pruning methods with more machinery than a one-function scorer; each module registers its scorer on import.

``compressor.api`` imports them so that ``--method <name>`` finds them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from ..errors import InputError


def reject_unknown_options(method: str, keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise a one-line :class:`InputError` naming the first of ``keys`` not in ``known`` (and its nearest match)."""
    known = tuple(known)
    unknown = sorted(set(keys) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown {method} option {unknown[0]!r}{hint}; known: {', '.join(known)}")
