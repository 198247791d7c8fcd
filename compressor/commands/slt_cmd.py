"""``compress slt``: a strong lottery ticket in a partially frozen random network (edge-popup; Otsuka et al.,
arXiv 2402.14029), stored as seeds + mask bits, exported to ONNX with parity, reloaded bit-identically.

A thin layer over :func:`compressor.slt_run.run_slt` (the method: :mod:`compressor.slt`).

Examples
--------
>>> from compressor.commands import slt_cmd
>>> from compressor.commands.common import make_app
>>> slt_cmd.register(make_app())  # then: compress slt --arch resnet20 --data train.npz --keep 0.5 --freeze 0.7
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import Debug, TrustPickle, parse_bench_batches, run_guarded, setup_logging

__all__ = ["EXAMPLE", "register", "slt_command"]

EXAMPLE = ("Example: compress slt --arch resnet20 --data train.npz --eval-data test.npz --normalize imagenet "
           "--keep 0.5 --freeze 0.7 --epochs 10 --out runs/slt-k05-f07")
HELP = (
    "Find a strong lottery ticket: a subnetwork of a seeded random network that is accurate without any weight "
    "training. Edge-popup (Ramanujan et al. 2020) learns a score per weight and keeps each layer's top --keep; "
    "before the search a random --freeze of the weights is frozen (Otsuka et al., arXiv 2402.14029): a share "
    "--freeze-prune of them pruned for good, the rest locked in, so only 1 - F of the weights are searched and the "
    "ticket is stored as seeds + one mask bit per searched weight + the BatchNorm statistics (ticket.slt; "
    "compressor.slt.load_slt rebuilds it bit-identically). Baselines through the same command: --freeze 0 (the dense "
    "source), --freeze-prune 1 (a randomly pruned source of the same search-space size), --train-weights (the "
    "weight-trained network). Writes ticket.slt, model.onnx (the masked dense network, parity-checked), report.json "
    f"and report.md into --out.\n\n{EXAMPLE}"
)


_ARCH = Annotated[Optional[str], typer.Option(
        help="Architecture of the random source network: a built-in name (resnet20..resnet110, vgg11_bn, vgg16_bn, "
             "mobilenetv2, samplenet), path/to/file.py:fn or package.module:fn. E.g. --arch resnet20")]
_MODEL = Annotated[Optional[Path], typer.Option(
        help="A checkpoint that only names the architecture (its weights are never used). E.g. --model "
             "resnet20.th --arch resnet20")]
_DATA = Annotated[Optional[str], typer.Option(
        help="Training images for the score search: .npz, ImageFolder, CIFAR-10 dir or file.py:fn. E.g. --data "
             "train.npz")]
_EVAL_DATA = Annotated[Optional[str], typer.Option(
        help="Evaluation images (default: --eval-images class-balanced images of --data). E.g. --eval-data "
             "test.npz")]
_NORMALIZE = Annotated[str, typer.Option(
        help="Input normalisation after scaling to [0,1]: imagenet, cifar, none or m1,m2,m3/s1,s2,s3. E.g. "
             "--normalize imagenet")]
_KEEP = Annotated[float, typer.Option(
        help="Fraction of the weights in the final ticket, in (0, 1). E.g. --keep 0.5")]
_FREEZE = Annotated[float, typer.Option(
        help="Fraction of the weights frozen before the search, in [0, 1) (0 = the dense source). E.g. --freeze "
             "0.7")]
_FREEZE_PRUNE = Annotated[Optional[float], typer.Option(
        help="Share of the frozen weights that are pruned (the rest are locked in), in [0, 1] (default: 1 - the "
             "layer's keep ratio; 1 = a randomly pruned source). E.g. --freeze-prune 0.5")]
_DISTRIBUTION = Annotated[str, typer.Option(
        help="Per-layer keep ratios: uniform or erk (Erdos-Renyi-kernel). E.g. --distribution erk")]
_INIT = Annotated[str, typer.Option(
        help="Random weights: signed-constant or kaiming-normal (edge-popup's). E.g. --init kaiming-normal")]
_SCALE_FAN = Annotated[bool, typer.Option(
        "--scale-fan/--no-scale-fan", help="Scale the initialisation's fan by the layer's keep ratio (edge-popup's "
                                           "scale_fan).")]
_SEED = Annotated[int, typer.Option(help="Seed of the random weights (and of batch order, augmentation and, with "
                                           "--train-weights, the initialisation). E.g. --seed 0")]
_FREEZE_SEED = Annotated[int, typer.Option(help="Seed of the freezing pattern. E.g. --freeze-seed 1")]
_SCORE_SEED = Annotated[int, typer.Option(help="Seed of the scores' initialisation. E.g. --score-seed 2")]
_TRAIN_WEIGHTS = Annotated[bool, typer.Option(
        "--train-weights", help="Baseline: train the weights of the architecture (standard init, affine BatchNorm) "
                                "instead of searching a ticket; --keep/--freeze are ignored.")]
_EPOCHS = Annotated[Optional[int], typer.Option(help="Epochs of score search (or weight training); default 10. "
                                                       "E.g. --epochs 10")]
_BUDGET_MINUTES = Annotated[Optional[float], typer.Option(
        help="Instead of --epochs: train for this many wall-clock minutes (cosine schedule over the time). E.g. "
             "--budget-minutes 20")]
_LR = Annotated[float, typer.Option(help="Peak learning rate (cosine schedule). E.g. --lr 0.1")]
_OPTIMIZER = Annotated[str, typer.Option(help="sgd or adamw. E.g. --optimizer sgd")]
_WEIGHT_DECAY = Annotated[float, typer.Option(help="Weight decay (on the scores). E.g. --weight-decay 5e-4")]
_BATCH_SIZE = Annotated[int, typer.Option(help="Training batch size. E.g. --batch-size 128")]
_TRAIN_IMAGES = Annotated[Optional[int], typer.Option(
        help="Use this many class-balanced images of --data (default: all). E.g. --train-images 10000")]
_EVAL_IMAGES = Annotated[int, typer.Option(
        help="Images of --data evaluated when --eval-data is not given. E.g. --eval-images 1000")]
_AUGMENT = Annotated[Optional[bool], typer.Option(
        "--augment/--no-augment", help="Crop+flip while training (default: on for 32x32 images).")]
_BN_RECALIB = Annotated[int, typer.Option(
        help="Images of --data on which the ticket's BatchNorm statistics are re-estimated after the search (0 = "
             "off). E.g. --bn-recalib 1024")]
_DEVICE = Annotated[str, typer.Option(help="auto, cpu or cuda. E.g. --device cpu")]
_THREADS = Annotated[Optional[int], typer.Option(help="Threads for training, evaluation and onnxruntime. E.g. "
                                                        "--threads 1")]
_BENCH_BATCH = Annotated[str, typer.Option(help="onnxruntime latency batch sizes; none skips. E.g. --bench-batch "
                                                  "1,32")]
_BENCH_REPEATS = Annotated[int, typer.Option(help="Timed runs per graph and batch. E.g. --bench-repeats 30")]
_ATOL = Annotated[float, typer.Option(help="Max |PyTorch - onnxruntime| accepted. E.g. --atol 1e-4")]
_OUT = Annotated[Path, typer.Option(help="Output folder. E.g. --out runs/slt")]
_OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace outputs already in --out.")]
_JSON_OUTPUT = Annotated[bool, typer.Option("--json", help="Print report.json to stdout.")]
_PROGRESS = Annotated[bool, typer.Option("--progress/--no-progress", help="One line per epoch on stderr.")]


def slt_command(
    arch: _ARCH = None,
    model: _MODEL = None,
    data: _DATA = None,
    eval_data: _EVAL_DATA = None,
    normalize: _NORMALIZE = "none",
    keep: _KEEP = 0.5,
    freeze: _FREEZE = 0.0,
    freeze_prune: _FREEZE_PRUNE = None,
    distribution: _DISTRIBUTION = "uniform",
    init: _INIT = "signed-constant",
    scale_fan: _SCALE_FAN = True,
    seed: _SEED = 0,
    freeze_seed: _FREEZE_SEED = 1,
    score_seed: _SCORE_SEED = 2,
    train_weights: _TRAIN_WEIGHTS = False,
    epochs: _EPOCHS = None,
    budget_minutes: _BUDGET_MINUTES = None,
    lr: _LR = 0.1,
    optimizer: _OPTIMIZER = "sgd",
    weight_decay: _WEIGHT_DECAY = 5e-4,
    batch_size: _BATCH_SIZE = 128,
    train_images: _TRAIN_IMAGES = None,
    eval_images: _EVAL_IMAGES = 1000,
    augment: _AUGMENT = None,
    bn_recalib: _BN_RECALIB = 1024,
    device: _DEVICE = "auto",
    threads: _THREADS = None,
    bench_batch: _BENCH_BATCH = "1,32",
    bench_repeats: _BENCH_REPEATS = 30,
    atol: _ATOL = 1e-4,
    out: _OUT = Path("slt"),
    overwrite: _OVERWRITE = False,
    json_output: _JSON_OUTPUT = False,
    progress: _PROGRESS = True,
    trust_pickle: TrustPickle = False,
    debug: Debug = False,
) -> None:
    """Thin CLI layer: validate, call :func:`compressor.slt_run.run_slt`, print one summary line (or the JSON)."""
    setup_logging(debug)
    options = dict(locals())
    code, _ = run_guarded(lambda: _work(options), debug=debug)
    raise typer.Exit(code)


def _work(kw: dict[str, Any]) -> None:
    import json
    import sys

    from ..slt import SLTConfig
    from ..slt_run import run_slt

    cfg = SLTConfig(keep=kw["keep"], freeze=kw["freeze"], freeze_prune=kw["freeze_prune"],
                    distribution=kw["distribution"], init=kw["init"], scale_fan=kw["scale_fan"],
                    weight_seed=kw["seed"], freeze_seed=kw["freeze_seed"], score_seed=kw["score_seed"])
    batches = parse_bench_batches(kw["bench_batch"])
    epochs = kw["epochs"] if kw["epochs"] is not None or kw["budget_minutes"] is not None else 10
    names = ("arch", "model", "data", "eval_data", "normalize", "train_weights", "budget_minutes", "lr", "optimizer",
             "weight_decay", "batch_size", "train_images", "eval_images", "augment", "bn_recalib", "seed", "device",
             "threads", "atol", "out", "overwrite", "trust_pickle", "progress", "bench_repeats")
    result = run_slt(slt=cfg, epochs=epochs, bench_batches=batches, command=sys.argv[1:], **{n: kw[n] for n in names})
    r = result.report
    if kw["json_output"]:
        typer.echo(json.dumps(r, indent=1))
        return
    size = r["size"]
    stored = (f"{size['total_bits']:,} bits stored ({size['mask_bits']:,} mask bits; dense-source ticket "
              f"{size['dense_source_slt_bits']:,}, fp32 weights {size['fp32_weight_trained_bits']:,})"
              if "mask_bits" in size else f"{size['fp32_bits']:,} bits fp32")
    typer.echo(f"{r['kind']}: top-1 {100 * r['accuracy']:.2f} % on {r['evaluated_on']}; {stored}; model.onnx "
               f"{r['onnx']['bytes']:,} bytes; wrote {', '.join(sorted(result.files))} to {result.out_dir}")


def register(app: typer.Typer) -> None:
    """Add ``slt`` to ``app``."""
    app.command("slt", help=HELP)(slt_command)
