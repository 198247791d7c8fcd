"""``compress``: the command line, a thin layer over :func:`compressor.compress`.

Bad input ends with a one-line error on stderr and exit code 2 (no traceback unless ``--debug``); an unexpected
failure exits 1; Ctrl-C exits 130. Nothing is written unless the whole run succeeded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

EXAMPLE = (
    "Example: compress resnet56.th --arch resnet56 --data train.npz --eval-data test.npz --normalize imagenet "
    "--method l1 --target 0.33 --epochs 2 --out runs/r56-l1"
)
app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

MODEL, DATA, METHOD, CMI, MIPP, TUCKER, TUNE, BENCH, OUT = "Model", "Data", "Method and target", "cmi options", \
    "mipp options", "tucker options", "Fine-tuning", "Verify and benchmark", "Output"


def _methods_help() -> str:
    """One line per registered method, from the registry so --help stays true as methods are added."""
    from .pruning.scorers import get_scorer, list_scorers
    from .transforms import list_methods

    described = [f"{name} ({get_scorer(name).description})" for name in list_scorers()]
    others = [name for name in list_methods() if name not in list_scorers()]
    return "; ".join(described + others)


def _method_options(**given: object) -> dict:
    """Only the method options the user set: unset flags keep the method's own defaults."""
    return {k: v for k, v in given.items() if v is not None}


def _width(text: str | None) -> str | float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _batches(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated batch sizes such as 1,32; got {text!r}") from None
    if any(v < 1 for v in values):
        raise typer.BadParameter(f"batch sizes must be >= 1; got {text!r}")
    return values


@app.command(help=f"Compress a trained PyTorch CNN into a smaller, faster, verified ONNX graph.\n\n{EXAMPLE}")
def main_command(
    model: Annotated[Path, typer.Argument(help="Checkpoint or state_dict (.pt/.pth/.th); e.g. resnet56.th")],
    arch: Annotated[Optional[str], typer.Option(
        help="Architecture: a built-in name (resnet20..resnet110, vgg11_bn, vgg16_bn, mobilenetv2, samplenet), "
             "path/to/file.py:fn or package.module:fn. E.g. --arch resnet56", rich_help_panel=MODEL)] = None,
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow loading a whole pickled nn.Module. Unpickling runs code: only for files you "
                               "trust.", rich_help_panel=MODEL)] = False,
    data: Annotated[Optional[str], typer.Option(
        help="Calibration and fine-tuning data: .npz with x,y; ImageFolder dir; CIFAR-10 python dir; or "
             "file.py:fn. E.g. --data train.npz", rich_help_panel=DATA)] = None,
    eval_data: Annotated[Optional[str], typer.Option(
        help="Evaluation data (same formats) for top-1 before/after and the parity check. E.g. --eval-data "
             "test.npz", rich_help_panel=DATA)] = None,
    normalize: Annotated[str, typer.Option(
        help="Input normalisation after scaling to [0,1]: imagenet, cifar, none, or m1,m2,m3/s1,s2,s3. "
             "E.g. --normalize imagenet", rich_help_panel=DATA)] = "none",
    calib_samples: Annotated[int, typer.Option(
        help="Images of --data used by data-driven methods. E.g. --calib-samples 256", rich_help_panel=DATA)] = 256,
    bn_recalib: Annotated[int, typer.Option(
        help="Images of --data on which BatchNorm statistics of the compressed model are re-estimated before "
             "evaluation and fine-tuning (0 = off). E.g. --bn-recalib 0", rich_help_panel=DATA)] = 1024,
    augment: Annotated[Optional[bool], typer.Option(
        "--augment/--no-augment", help="Crop+flip during fine-tuning (default: on for 32x32 images).",
        rich_help_panel=DATA, show_default=False)] = None,
    method: Annotated[str, typer.Option(
        help=f"Compression method: {_methods_help()}. E.g. --method l1", rich_help_panel=METHOD)] = "l1",
    target: Annotated[float, typer.Option(
        help="Fraction of --target-metric to remove, in (0, 1). E.g. --target 0.33", rich_help_panel=METHOD)] = 0.33,
    target_metric: Annotated[Optional[str], typer.Option(
        help="What --target counts: filters (conv output channels; default for pruning), params (default for "
             "factorisation) or macs. E.g. --target-metric macs", rich_help_panel=METHOD)] = None,
    round_to: Annotated[int, typer.Option(
        help="Keep channel counts at multiples of K where the target allows (1 = exact). onnxruntime runs convs in "
             "channel blocks: on an AVX-512 CPU, ResNet-56 at --target 0.33 ran 1.33x faster with 8 vs 1.17x with 1 "
             "(batch 1, 1 thread; benchmarks/round_to.py). E.g. --round-to 16", rich_help_panel=METHOD)] = 8,
    min_keep: Annotated[float, typer.Option(
        help="Each layer group keeps at least this fraction of its channels. E.g. --min-keep 0.1",
        rich_help_panel=METHOD)] = 0.1,
    ignore_layer: Annotated[Optional[list[str]], typer.Option(
        help="Never prune the group of this layer (repeatable). E.g. --ignore-layer layer3.0.conv1",
        rich_help_panel=METHOD)] = None,
    cmi_alpha: Annotated[Optional[float], typer.Option(
        help="cmi: Renyi entropy order; 2 uses the Frobenius shortcut (34x faster than 1.01 on ResNet-56). "
             "E.g. --cmi-alpha 1.01 [default: 2]", rich_help_panel=CMI)] = None,
    cmi_condition: Annotated[Optional[str], typer.Option(
        help="cmi: conditioning set: layer (none), full (kept channels of all earlier layers), compact (the "
             "adjacent earlier layer). E.g. --cmi-condition compact [default: layer]", rich_help_panel=CMI)] = None,
    cmi_cutoff: Annotated[Optional[str], typer.Option(
        help="cmi: where to cut each layer's ranking: target (meet --target), scree (elbow), permutation (test). "
             "E.g. --cmi-cutoff scree [default: target]", rich_help_panel=CMI)] = None,
    cmi_direction: Annotated[Optional[str], typer.Option(
        help="cmi: forward (first layer to last) or bidirectional (outward from the most pruned layer). "
             "E.g. --cmi-direction bidirectional [default: forward]", rich_help_panel=CMI)] = None,
    cmi_kernel_width: Annotated[Optional[str], typer.Option(
        help="cmi: Gaussian kernel width: median (per variable), silverman, or a number. E.g. --cmi-kernel-width 2.5 "
             "[default: median]", rich_help_panel=CMI)] = None,
    cmi_pool: Annotated[Optional[int], typer.Option(
        help="cmi: average-pool maps to this size before the kernel (0 = no pooling). E.g. --cmi-pool 2 "
             "[default: 4]", rich_help_panel=CMI)] = None,
    mipp_estimator: Annotated[Optional[str], typer.Option(
        help="mipp: how the information a channel carries to the next layer is measured: predictor (held-out loss "
             "of a linear predictor with the next layer's geometry) or renyi (matrix-based Renyi MI: cheaper per pass "
             "but blind to spatial layout; on ResNet-20/56 it needed more search passes and kept less accuracy). "
             "E.g. --mipp-estimator renyi [default: predictor]", rich_help_panel=MIPP)] = None,
    mipp_confidence: Annotated[Optional[float], typer.Option(
        help="mipp: keep a channel only if removing it raises the loss with more than this confidence; unset, it "
             "is searched to meet --target. E.g. --mipp-confidence 0.95", rich_help_panel=MIPP)] = None,
    mipp_repeats: Annotated[Optional[int], typer.Option(
        help="mipp: repeats (folds) of the loss estimate behind each decision. E.g. --mipp-repeats 5 [default: 5]",
        rich_help_panel=MIPP)] = None,
    rank_rule: Annotated[Optional[str], typer.Option(
        help="tucker: rank selection: target (meet --target), evbmf (empirical variational Bayes) or energy. "
             "E.g. --rank-rule evbmf [default: target]", rich_help_panel=TUCKER)] = None,
    energy: Annotated[Optional[float], typer.Option(
        help="tucker: singular-value energy kept by --rank-rule energy. E.g. --energy 0.95 [default: 0.9]",
        rich_help_panel=TUCKER)] = None,
    tucker_adaptive: Annotated[Optional[bool], typer.Option(
        "--tucker-adaptive", help="tucker: rank-adaptive fine-tuning (ranks grow and shrink; needs --epochs).",
        rich_help_panel=TUCKER, show_default=False)] = None,
    tau: Annotated[Optional[float], typer.Option(
        help="tucker: truncation tolerance of --tucker-adaptive (larger = smaller ranks). E.g. --tau 0.2 "
             "[default: 0.1]", rich_help_panel=TUCKER)] = None,
    latency_aware: Annotated[Optional[bool], typer.Option(
        "--latency-aware", help="tucker: keep only factorisations measured faster in onnxruntime.",
        rich_help_panel=TUCKER, show_default=False)] = None,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (0 = none). E.g. --epochs 2",
                                        rich_help_panel=TUNE)] = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule). E.g. --lr 0.01",
                                      rich_help_panel=TUNE)] = 0.01,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw. E.g. --optimizer adamw", rich_help_panel=TUNE)] = "sgd",
    batch_size: Annotated[int, typer.Option(help="Fine-tuning/eval batch size. E.g. --batch-size 128",
                                            rich_help_panel=TUNE)] = 128,
    distill: Annotated[bool, typer.Option("--distill", help="Distil from the uncompressed model while fine-tuning.",
                                          rich_help_panel=TUNE)] = False,
    at_init: Annotated[bool, typer.Option(
        "--at-init", help="Score and prune a randomly re-initialised copy (seeded by --seed), then train the pruned "
                          "network from scratch for --epochs. E.g. --at-init --epochs 30 --lr 0.1",
        rich_help_panel=TUNE)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (auto: CUDA with AMP when available). "
                                             "E.g. --device cpu", rich_help_panel=TUNE)] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for sampling, scoring and fine-tuning. E.g. --seed 0",
                                      rich_help_panel=TUNE)] = 0,
    bench_batch: Annotated[str, typer.Option(
        help="Batch sizes for the onnxruntime latency benchmark; 'none' skips it. E.g. --bench-batch 1,32",
        rich_help_panel=BENCH)] = "1,32",
    threads: Annotated[Optional[int], typer.Option(
        help="onnxruntime intra-op threads (default: onnxruntime's choice). E.g. --threads 2",
        rich_help_panel=BENCH)] = None,
    bench_repeats: Annotated[int, typer.Option(help="Timed runs per model and batch size. E.g. --bench-repeats 50",
                                               rich_help_panel=BENCH)] = 50,
    atol: Annotated[float, typer.Option(help="Max |PyTorch - onnxruntime| accepted. E.g. --atol 1e-4",
                                        rich_help_panel=BENCH)] = 1e-4,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: a new folder beside the model). E.g. --out runs/r56-l1",
        rich_help_panel=OUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace outputs already in --out.",
                                            rich_help_panel=OUT)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print report.json to stdout instead of the table.",
                                              rich_help_panel=OUT)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.", rich_help_panel=OUT)] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    options = dict(
        arch=arch, trust_pickle=trust_pickle, method=method, target=target, target_metric=target_metric,
        round_to=round_to, min_keep=min_keep, ignore_layers=tuple(ignore_layer or ()), calib_samples=calib_samples,
        bn_recalib=bn_recalib,
        epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, distill=distill, augment=augment,
        device=device, seed=seed, bench_batches=_batches(bench_batch), threads=threads, bench_repeats=bench_repeats,
        atol=atol, overwrite=overwrite, at_init=at_init,
        method_options=_method_options(cmi_alpha=cmi_alpha, cmi_condition=cmi_condition, cmi_cutoff=cmi_cutoff,
                                       cmi_direction=cmi_direction, cmi_kernel_width=_width(cmi_kernel_width),
                                       cmi_pool=cmi_pool, mipp_estimator=mipp_estimator,
                                       mipp_confidence=mipp_confidence, mipp_repeats=mipp_repeats,
                                       tucker_rank_rule=rank_rule, tucker_energy=energy,
                                       tucker_adaptive=tucker_adaptive, tucker_tau=tau,
                                       tucker_latency_aware=latency_aware),
    )
    code = _run(model, data=data, eval_data=eval_data, normalize=normalize, out=out, options=options,
                json_output=json_output, debug=debug)
    raise typer.Exit(code)


def _run(model: Path, *, data: str | None, eval_data: str | None, normalize: str, out: Path | None,
         options: dict, json_output: bool, debug: bool) -> int:
    """Call the API; map errors onto exit codes (2: bad input, 1: bug, 130: interrupted)."""
    from exporters.errors import ExportError

    from .errors import CompressorError

    try:
        from .api import compress, default_out_dir
        from .report import print_table, to_json

        if out is None:
            out = default_out_dir(model, options["method"], options["target"])
        result = compress(model, data=data, eval_data=eval_data, normalize=normalize, out=out,
                          command=sys.argv[1:], **options)
    except (CompressorError, ExportError) as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted: no output was written", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1, traceback under --debug
        if debug:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)", err=True)
        return 1
    if json_output:
        typer.echo(to_json(result.report), nl=False)
    else:
        print_table(result.report)
        typer.echo(f"wrote {', '.join(sorted(result.files))} to {result.out_dir}", err=True)
    return 0


def main() -> None:
    """Console-script entry point (``compress``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
