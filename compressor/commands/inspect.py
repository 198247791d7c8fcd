"""``compress inspect``: layers, prunable channel groups and totals of a model; writes nothing.

A thin layer over :func:`compressor.inspect.inspect_checkpoint` and :func:`compressor.inspect.render_summary`.

Examples
--------
>>> from compressor.commands import inspect
>>> from compressor.commands.common import make_app
>>> app = make_app()
>>> inspect.register(app)  # then: compress inspect samples/samplenet.pt --arch samplenet
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import Debug, TrustPickle, parse_ints, run_guarded, setup_logging

__all__ = ["EXAMPLE", "inspect_command", "register"]

EXAMPLE = "Example: compress inspect resnet56.th --arch resnet56 --ignore-layer conv1 --json"
HELP = (
    "Show a model's Conv2d/Linear layers (channels, kernel, stride, groups, params, MACs for one image), its "
    "prunable channel groups (the layers whose outputs and inputs are removed together) and its totals. "
    f"Nothing is written.\n\n{EXAMPLE}"
)


def inspect_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint or state_dict (.pt/.pth/.th); e.g. resnet56.th")],
    arch: Annotated[Optional[str], typer.Option(
        help="Architecture: a built-in name (resnet20..resnet110, vgg11_bn, vgg16_bn, mobilenetv2, samplenet), "
             "path/to/file.py:fn or package.module:fn; optional when the checkpoint records it. "
             "E.g. --arch resnet56")] = None,
    trust_pickle: TrustPickle = False,
    input_shape: Annotated[Optional[str], typer.Option(
        help="Per-image input shape C,H,W (default: the architecture's; required for a pickled module or a "
             "file.py:fn factory). E.g. --input-shape 3,32,32")] = None,
    ignore_layer: Annotated[Optional[list[str]], typer.Option(
        help="Leave out the group of this layer, as compress --ignore-layer would (repeatable). "
             "E.g. --ignore-layer layer3.0.conv1")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of tables.")] = False,
    debug: Debug = False,
) -> None:
    """Thin CLI layer: parse flags, call :func:`compressor.inspect.inspect_checkpoint`, print, exit."""
    setup_logging(debug)

    def work() -> None:
        from ..inspect import inspect_checkpoint, render_summary

        shape = parse_ints(input_shape, flag="--input-shape", example="3,32,32") if input_shape else None
        summary = inspect_checkpoint(model, arch=arch, trust_pickle=trust_pickle, input_shape=shape,
                                     ignore=tuple(ignore_layer or ()))
        if json_output:
            typer.echo(json.dumps(summary.to_dict(), indent=2))
        else:
            render_summary(summary)

    code, _ = run_guarded(work, debug=debug)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``inspect`` to ``app``.

    >>> register(make_app())  # doctest: +SKIP
    """
    app.command("inspect", help=HELP)(inspect_command)
