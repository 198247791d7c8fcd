"""What every subcommand shares: error-to-exit-code mapping, logging, the app settings, integer-list flags.

Exit codes, as for ``compress MODEL``: 0 success; 2 bad input (``error: <message>``, one line on stderr); 1 an
unexpected error (one line, the traceback with ``--debug``); 130 interrupted.

Examples
--------
>>> from compressor.commands.common import run_guarded
>>> run_guarded(lambda: 42, debug=False)
(0, 42)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from exporters.errors import ExportError

from ..errors import CompressorError, InputError

__all__ = ["make_app", "parse_bench_batches", "parse_ints", "run_guarded", "setup_logging"]

T = TypeVar("T")

#: ``--debug``: the same option on every subcommand.
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
#: ``--trust-pickle``: subcommands that load a model.
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading a whole pickled nn.Module. Unpickling runs code: only for files you trust.")]


def run_guarded(fn: Callable[[], T], *, debug: bool) -> tuple[int, T | None]:
    """Call ``fn`` and turn what it raises into an exit code and one line on stderr.

    Parameters
    ----------
    fn : callable
        The work, without arguments (a lambda or ``functools.partial``).
    debug : bool
        Re-raise errors so their traceback shows (``--debug``).

    Returns
    -------
    (int, result or None)
        ``(0, fn())`` on success; ``(2, None)`` for :class:`~compressor.errors.CompressorError` and
        :class:`exporters.ExportError` (bad input), ``(130, None)`` for Ctrl-C, ``(1, None)`` for anything else.

    Examples
    --------
    >>> from compressor.errors import InputError
    >>> def bad() -> None:
    ...     raise InputError("--batch must be positive")
    >>> run_guarded(bad, debug=False)  # prints "error: --batch must be positive" on stderr
    (2, None)
    """
    try:
        return 0, fn()
    except (CompressorError, ExportError) as exc:
        if debug:
            raise
        typer.echo(f"error: {_one_line(exc)}", err=True)
        return 2, None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130, None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1, traceback under --debug
        if debug:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {_one_line(exc)} (re-run with --debug for the traceback)",
                   err=True)
        return 1, None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def setup_logging(debug: bool) -> None:
    """Log messages to stderr: DEBUG with ``--debug``, else INFO (as ``compress MODEL`` does)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    if not debug:  # onnxruntime's quantisation tools log every step at INFO ("Performing symbolic shape inference...")
        logging.getLogger("onnxruntime").setLevel(logging.WARNING)


def make_app(**settings: object) -> typer.Typer:
    """A Typer app configured like ``compressor.cli.app`` (plain help text, no pretty exceptions, ``-h``).

    >>> from compressor.commands import bench, inspect
    >>> app = make_app()
    >>> inspect.register(app); bench.register(app)
    """
    options: dict[str, object] = dict(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                                      context_settings={"help_option_names": ["-h", "--help"]})
    options.update(settings)
    return typer.Typer(**options)  # type: ignore[arg-type]


def parse_ints(text: str, *, flag: str, example: str) -> tuple[int, ...]:
    """``"1,32"`` -> ``(1, 32)``; anything but comma-separated positive ints raises ``InputError`` naming ``flag``.

    >>> parse_ints("3,32,32", flag="--input-shape", example="3,32,32")
    (3, 32, 32)
    """
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{flag} expects comma-separated integers such as {example}; got {text!r}") from None
    if any(v < 1 for v in values):
        raise InputError(f"{flag} values must be >= 1; got {text!r}")
    return values


def parse_bench_batches(text: str) -> tuple[int, ...]:
    """``--bench-batch``: ``"1,32"`` -> ``(1, 32)``; ``none``, ``0`` or empty -> ``()`` (no benchmark)."""
    if text.strip().lower() in ("", "none", "0"):
        return ()
    return parse_ints(text, flag="--bench-batch", example="1,32")
