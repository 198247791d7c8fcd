"""``compress stability``: linear-mode-connectivity instability of a model; writes JSON, markdown and a PNG plot.

A thin layer over :func:`compressor.stability.stability` and :func:`compressor.stability.save_stability`.

Examples
--------
>>> from compressor.commands import stability_cmd
>>> from compressor.commands.common import make_app
>>> stability_cmd.register(make_app())  # then: compress stability runs/r20/compressed.pt --data train.npz ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import Debug, TrustPickle, run_guarded, setup_logging

__all__ = ["EXAMPLE", "register", "stability_command"]

EXAMPLE = ("Example: compress stability runs/r20-l1/compressed.pt --data train.npz --eval-data test.npz "
           "--normalize imagenet --epochs 2 --out runs/r20-l1/stability")
HELP = (
    "Linear mode connectivity (Frankle et al., ICML 2020): train two copies of MODEL from the same weights with "
    "different SGD noise (batch order, augmentation), evaluate the error at --points coefficients on the straight "
    "line between them (BatchNorm statistics re-estimated at every point) and report the error barrier (the "
    "highest error on the path minus the mean of the endpoints') and both endpoints' top-1. MODEL is any checkpoint "
    "compress reads, compressed.pt included; the weight masks of --method imp --imp-granularity weight stay in "
    "force while both copies train. Writes stability.json, stability.md and stability.png into --out "
    f"(the plot needs matplotlib: pip install \"compressor[bench]\", or pass --no-plot).\n\n{EXAMPLE}"
)


def stability_command(
    model: Annotated[Path, typer.Argument(
        help="Checkpoint, state_dict or compressed.pt; e.g. runs/r20-l1/compressed.pt", show_default=False)],
    data: Annotated[Optional[str], typer.Option(
        help="Training images of both copies (and BatchNorm re-estimation): .npz, ImageFolder, CIFAR-10 dir or "
             "file.py:fn. E.g. --data train.npz")] = None,
    eval_data: Annotated[Optional[str], typer.Option(
        help="Images the path is evaluated on (default: --eval-images images of --data). E.g. --eval-data "
             "test.npz")] = None,
    out: Annotated[Path, typer.Option(help="Output folder. E.g. --out runs/r20/stability")] = Path("stability"),
    arch: Annotated[Optional[str], typer.Option(
        help="Architecture for a plain state_dict (built-in name, file.py:fn or module:fn). E.g. --arch "
             "resnet20")] = None,
    normalize: Annotated[str, typer.Option(
        help="Input normalisation after scaling to [0,1]: imagenet, cifar, none or m1,m2,m3/s1,s2,s3. E.g. "
             "--normalize imagenet")] = "none",
    epochs: Annotated[Optional[int], typer.Option(help="Training budget of each copy in epochs. E.g. --epochs 2")]
    = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Instead of --epochs: training budget of each copy in SGD steps. E.g. --steps 500")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule). E.g. --lr 0.01")] = 0.01,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw. E.g. --optimizer sgd")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="Weight decay. E.g. --weight-decay 5e-4")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Training and evaluation batch size. E.g. --batch-size 128")] = 128,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Crop+flip while training.")] = True,
    seed_a: Annotated[int, typer.Option(help="SGD-noise seed of copy A (batch order, augmentation).")] = 1,
    seed_b: Annotated[int, typer.Option(help="SGD-noise seed of copy B; equal to --seed-a gives two identical "
                                             "runs (barrier 0).")] = 2,
    points: Annotated[int, typer.Option(help="Interpolation coefficients, endpoints included. E.g. --points 21")]
    = 21,
    bn_images: Annotated[int, typer.Option(
        help="Images of --data on which BatchNorm statistics are re-estimated at every point. E.g. --bn-images "
             "1024")] = 1024,
    eval_images: Annotated[int, typer.Option(
        help="Images of --data evaluated when --eval-data is not given. E.g. --eval-images 1000")] = 1000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda. E.g. --device cpu")] = "auto",
    trust_pickle: TrustPickle = False,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write stability.png (needs matplotlib).")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace outputs already in --out.")] = False,
    debug: Debug = False,
) -> None:
    """Thin CLI layer: check the output folder, call :func:`compressor.stability.stability`, save, print."""
    setup_logging(debug)
    options = dict(locals())
    code, _ = run_guarded(lambda: _work(options), debug=debug)
    raise typer.Exit(code)


def _work(kw: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from ..stability import check_out_dir, save_stability, stability

    check_out_dir(kw["out"], overwrite=kw["overwrite"], plot=kw["plot"])
    names = ("data", "eval_data", "arch", "trust_pickle", "normalize", "epochs", "steps", "lr", "optimizer",
             "weight_decay", "batch_size", "augment", "points", "bn_images", "eval_images", "device")
    console = Console(stderr=True)
    with Progress(transient=True, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("linear path", total=max(kw["points"], 0), visible=False)
        result = stability(kw["model"], seeds=(kw["seed_a"], kw["seed_b"]), **{n: kw[n] for n in names},
                           progress=lambda i, _a: bar.update(task, completed=i, visible=True))
    files = save_stability(result, kw["out"], plot=kw["plot"], overwrite=kw["overwrite"])
    typer.echo(f"error barrier {100 * result.barrier:.2f} points; top-1 A {100 * result.accuracy_a:.2f} %, "
               f"B {100 * result.accuracy_b:.2f} %; wrote {', '.join(str(p) for p in files.values())}")


def register(app: typer.Typer) -> None:
    """Add ``stability`` to ``app``."""
    app.command("stability", help=HELP)(stability_command)
