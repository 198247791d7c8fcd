"""``compress distill``: dataset distillation by distribution matching; writes a ``.npz`` every ``--data`` accepts.

A thin layer over :func:`compressor.distill_data.distill` and :func:`compressor.distill_data.save_distilled`.

Examples
--------
>>> from compressor.commands import distill_cmd
>>> from compressor.commands.common import make_app
>>> distill_cmd.register(make_app())  # then: compress distill train.npz --images-per-class 10 --out distilled.npz
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import Debug, TrustPickle, run_guarded, setup_logging

__all__ = ["EXAMPLE", "distill_command", "register"]

EXAMPLE = "Example: compress distill train.npz --images-per-class 10 --iterations 500 --out distilled.npz"
HELP = (
    "Distil a dataset into K synthetic images per class by Distribution Matching (Zhao & Bilen, WACV 2023): "
    "synthetic images start as random real ones and are optimised so that, under randomly initialised embedding "
    "networks (a fresh one each iteration) and the same differentiable augmentation, their per-class mean embedding "
    "matches the real images'. Writes a .npz (x: float32 NCHW in [0, 1], y: int64) that any --data accepts, e.g. "
    f"compress ... --data distilled.npz.\n\n{EXAMPLE}"
)


def distill_command(
    data: Annotated[str, typer.Argument(
        help="The data to distil: .npz with x,y; ImageFolder dir; CIFAR-10 python dir; or file.py:fn. "
             "E.g. train.npz", show_default=False)],
    images_per_class: Annotated[int, typer.Option(
        "--images-per-class", "-k", help="K: synthetic images per class. E.g. --images-per-class 10")] = 10,
    out: Annotated[Path, typer.Option(help="Output .npz (written atomically). E.g. --out distilled.npz")] = Path(
        "distilled.npz"),
    model: Annotated[Optional[Path], typer.Option(
        help="Take the embedding architecture from this checkpoint (re-initialised at random every iteration; its "
             "weights are not used). E.g. --model resnet20.th --arch resnet20")] = None,
    arch: Annotated[Optional[str], typer.Option(
        help="Embedding architecture: convnet (the paper's ConvNet-3, default), a built-in name (resnet20, ...), "
             "path/to/file.py:fn or package.module:fn. E.g. --arch convnet")] = None,
    width: Annotated[int, typer.Option(help="Channels of --arch convnet (the paper: 128). E.g. --width 64")] = 128,
    iterations: Annotated[int, typer.Option(
        help="SGD steps on the synthetic images (the paper: 20000). E.g. --iterations 500")] = 1000,
    batch_real: Annotated[int, typer.Option(
        help="Real images per class and iteration (the paper: 256). E.g. --batch-real 64")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate on the images (the paper: 1.0). E.g. --lr 1.0")] = 1.0,
    dsa: Annotated[bool, typer.Option(
        "--dsa/--no-dsa", help="Differentiable Siamese augmentation of real and synthetic batches.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the initial images, batches, augmentations and networks.")] = 0,
    trust_pickle: TrustPickle = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    debug: Debug = False,
) -> None:
    """Thin CLI layer: check the output, call :func:`compressor.distill_data.distill`, save, print one line."""
    setup_logging(debug)
    options = dict(locals())
    code, _ = run_guarded(lambda: _work(options), debug=debug)
    raise typer.Exit(code)


def _work(kw: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..distill_data import check_output, distill, save_distilled

    path = check_output(kw["out"], inputs=[p for p in (kw["data"], kw["model"]) if p is not None],
                        overwrite=kw["overwrite"])
    columns = (TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    total = kw["iterations"]
    live = kw["progress"] and console.is_terminal  # logs and pipes: a line per tenth of the run instead of a bar
    every = max(1, total // 10) if kw["progress"] and not live else 0
    names = ("images_per_class", "model", "arch", "width", "iterations", "batch_real", "lr", "dsa", "seed",
             "trust_pickle")
    with Progress(*columns, console=console, disable=not live, transient=True) as bar:
        task = bar.add_task("distill", total=max(total, 0), loss=float("nan"))

        def report(it: int, loss: float) -> None:
            bar.update(task, completed=it, loss=loss)
            if every and it % every == 0:
                typer.echo(f"distill {it}/{total}  loss {loss:.4g}", err=True)

        result = distill(kw["data"], progress=report, **{n: kw[n] for n in names})
    save_distilled(result, path)
    r = result.report
    typer.echo(f"wrote {path}: {len(result.y)} images ({r['images_per_class']} per class, {r['classes']} classes) "
               f"from {r['real_images']} in {r['seconds']:.0f} s; DM loss {r['loss_first']:.4g} -> "
               f"{r['loss_last_10_mean']:.4g} (mean of the last 10)")


def register(app: typer.Typer) -> None:
    """Add ``distill`` to ``app``."""
    app.command("distill", help=HELP)(distill_command)
