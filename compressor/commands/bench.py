"""``compress bench``: onnxruntime latency of ONNX graphs, interleaved in one run, with speed-ups over the first.

A thin layer over :func:`compressor.bench.bench_onnx` and :func:`compressor.bench.render_bench`.

Examples
--------
>>> from compressor.commands import bench
>>> from compressor.commands.common import make_app
>>> app = make_app()
>>> bench.register(app)  # then: compress bench original.onnx compressed.onnx --batch 1,32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import Debug, parse_ints, run_guarded, setup_logging

__all__ = ["EXAMPLE", "bench_command", "register"]

EXAMPLE = "Example: compress bench runs/r56-l1/original.onnx runs/r56-l1/compressed.onnx --batch 1,32 --threads 2"
HELP = (
    "Measure the onnxruntime latency of ONNX graphs in one interleaved run (A, B, A, B, ...): p50/p90/p99 per batch "
    "size, the speed-up of each graph over the first, and the providers the sessions actually used. The input "
    f"shape is read from the graphs, which must agree on it.\n\n{EXAMPLE}"
)


def bench_command(
    models: Annotated[list[Path], typer.Argument(
        help="ONNX files; the first is the baseline of the speed-ups. E.g. original.onnx compressed.onnx",
        show_default=False)],
    batch: Annotated[str, typer.Option(help="Batch sizes to time. E.g. --batch 1,32")] = "1,32",
    threads: Annotated[Optional[int], typer.Option(
        help="onnxruntime intra-op threads (default: onnxruntime's choice). E.g. --threads 2")] = None,
    repeats: Annotated[int, typer.Option(
        help="Timed rounds per batch size; each runs every graph once. E.g. --repeats 50")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed runs per graph and batch size. E.g. --warmup 5")] = 5,
    device: Annotated[str, typer.Option(
        help="auto (CUDA when onnxruntime offers it), cpu or cuda. E.g. --device cpu")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
    debug: Debug = False,
) -> None:
    """Thin CLI layer: parse flags, call :func:`compressor.bench.bench_onnx`, print, exit."""
    setup_logging(debug)

    def work() -> None:
        from ..bench import bench_onnx, render_bench

        batches = parse_ints(batch, flag="--batch", example="1,32")
        report = bench_onnx(models, batch_sizes=batches, threads=threads, repeats=repeats, warmup=warmup,
                            device=device)
        if json_output:
            typer.echo(json.dumps(report.to_dict(), indent=2))
        else:
            render_bench(report)

    code, _ = run_guarded(work, debug=debug)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``.

    >>> register(make_app())  # doctest: +SKIP
    """
    app.command("bench", help=HELP)(bench_command)
