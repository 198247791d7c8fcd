"""``compress``: the command line, a thin layer over :func:`compressor.compress` and the pipeline's stages.

``compress MODEL ...`` compresses (as it always did); ``compress methods``, ``compress inspect MODEL`` and
``compress bench A.onnx ...`` are subcommands. Every flag of ``compress MODEL`` is generated: the run options from
:data:`RUN_FLAGS` (checked against :class:`~compressor.config.CompressConfig` by the tests) and every method option
from the method's options dataclass (``--<method>-<option>``, one help panel per method), so an option is added in
one place. Bad input ends with a one-line error on stderr and exit code 2 (no traceback unless ``--debug``); an
unexpected failure exits 1; Ctrl-C exits 130. Nothing is written unless the whole run succeeded.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .commands import bench as bench_cmd
from .commands import distill_cmd, slt_cmd, stability_cmd
from .commands import inspect as inspect_cmd
from .commands import methods as methods_cmd
from .commands.common import make_app, parse_bench_batches, run_guarded, setup_logging
from .distributed import leave_if_failed
from .errors import InputError
from .methods import REGISTRY
from .methods.chain import Chain
from .options import OptionSpec

EXAMPLE = ("Example: compress resnet56.th --arch resnet56 --data train.npz --eval-data test.npz --normalize imagenet "
           "--method l1 --target 0.33 --epochs 2 --out runs/r56-l1")
SUBCOMMANDS = ("methods", "inspect", "bench", "distill", "stability", "slt")
MODEL, DATA, METHOD, TUNE, BENCH, OUT = ("Model", "Data", "Method and target", "Fine-tuning", "Verify and benchmark",
                                         "Output")


@dataclass(frozen=True)
class Flag:
    """One run flag: parameter name, type, default, help (with an example), help panel, extra spellings."""

    name: str
    kind: Any
    default: Any
    help: str
    panel: str
    decls: tuple[str, ...] = ()
    hidden: bool = False


def _methods_help() -> str:
    return "; ".join(f"{n} ({REGISTRY.get(n).summary})" for n in REGISTRY.names()) + "; chains such as cmi+tucker"


RUN_FLAGS: tuple[Flag, ...] = (
    Flag("arch", Optional[str], None, "Architecture: a built-in name (resnet20..resnet110, vgg11_bn, vgg16_bn, "
         "mobilenetv2, samplenet), torchvision:NAME or timm:NAME (model code of those packages, when installed), "
         "path/to/file.py:fn or package.module:fn. E.g. --arch resnet56, --arch torchvision:resnet18", MODEL),
    Flag("arch_kwargs", Optional[str], None, "Keyword arguments for the --arch factory, KEY=VALUE,... (ints, floats, "
         "true/false, none, else strings). E.g. --arch-kwargs num_classes=10,drop_rate=0.1", MODEL),
    Flag("trust_pickle", bool, False, "Allow loading a whole pickled nn.Module. Unpickling runs code: only for files "
         "you trust.", MODEL, ("--trust-pickle",)),
    Flag("data", Optional[str], None, "Calibration and fine-tuning data: .npz with x,y; ImageFolder dir; CIFAR-10 "
         "python dir; or file.py:fn. E.g. --data train.npz", DATA),
    Flag("eval_data", Optional[str], None, "Evaluation data (same formats) for top-1 before/after and the parity "
         "check. E.g. --eval-data test.npz", DATA),
    Flag("normalize", str, "none", "Input normalisation after scaling to [0,1]: imagenet, cifar, none, or "
         "m1,m2,m3/s1,s2,s3. E.g. --normalize imagenet", DATA),
    Flag("calib_samples", int, 256, "Images of --data used by data-driven methods. E.g. --calib-samples 256", DATA),
    Flag("bn_recalib", int, 1024, "Images of --data on which BatchNorm statistics of the compressed model are "
         "re-estimated before evaluation and fine-tuning (0 = off). E.g. --bn-recalib 0", DATA),
    Flag("augment", Optional[bool], None, "Crop+flip during fine-tuning (default: on for 32x32 images).", DATA,
         ("--augment/--no-augment",)),
    Flag("method", str, "l1", f"Compression method: {_methods_help()}. E.g. --method cmi", METHOD),
    Flag("target", Optional[float], None, "Fraction of --target-metric to remove, in (0, 1) [default: 0.33]. E.g. "
         "--target 0.33", METHOD),
    Flag("target_latency", Optional[float], None, "Instead of --target: a latency budget, as a fraction of the "
         "original's p50 on the graph that ships (INT8 or fp32, first --bench-batch, --threads). The smallest "
         "--target meeting it is searched by timing real compressions beside the original (0.2, 0.4, 0.6, 0.8, then "
         "3 bisection probes; each in the report). E.g. --target-latency 0.5", METHOD),
    Flag("target_metric", Optional[str], None, "What --target counts: filters (conv output channels; default for "
         "pruning), params (default for factorisation) or macs. E.g. --target-metric macs", METHOD),
    Flag("round_to", str, "auto", "Keep channel counts at multiples of K where the target allows (1 = exact; when K "
         "is too coarse, some groups get K/2, K/4...). auto: prune at K = 1, 2, 4, 8, 16, 32 and keep the graph "
         "measured fastest on what ships (INT8 or fp32, first --bench-batch, --threads); 8 when --bench-batch none. "
         "Default because the best K differs by graph: ResNet-56 l1 0.33, batch 1, 1 thread: fp32 2.63x faster at 16 "
         "vs 1.15x at 8, INT8 5.22x at 32 vs 4.18x at 8 (benchmarks/round_to_auto.py); it costs ~70-85 s on 2 CPUs "
         "(cmi/mipp: scoring x6). E.g. --round-to 16", METHOD),
    Flag("min_keep", float, 0.1, "Each layer group keeps at least this fraction of its channels. E.g. --min-keep 0.1",
         METHOD),
    Flag("ignore_layer", Optional[list[str]], None, "Never prune the group of this layer (repeatable). E.g. "
         "--ignore-layer layer3.0.conv1", METHOD),
    Flag("reconstruct", bool, True, "After pruning, refit each layer that lost input channels by least squares on "
         "--calib-samples images of --data, to reproduce the original layer's output (ThiNet / He et al. 2017).",
         TUNE, ("--reconstruct/--no-reconstruct",)),
    Flag("epochs", int, 0, "Fine-tuning epochs (0 = none). E.g. --epochs 2", TUNE),
    Flag("budget_minutes", Optional[float], None, "Instead of --epochs: fine-tune for this many wall-clock minutes, "
         "the learning-rate schedule fitted to the time (as many epochs as fit). E.g. --budget-minutes 60", TUNE),
    Flag("eval_every_minutes", Optional[float], None, "While fine-tuning, also record top-1 on --eval-data every M "
         "minutes of training (report.json finetune.curve; these evaluations are not counted in the minutes or "
         "the budget). E.g. --eval-every-minutes 5", TUNE),
    Flag("lr", float, 0.01, "Peak learning rate (cosine schedule). E.g. --lr 0.01", TUNE),
    Flag("optimizer", str, "sgd", "sgd or adamw. E.g. --optimizer adamw", TUNE),
    Flag("weight_decay", float, 5e-4, "Weight decay (L2 for SGD, decoupled for AdamW). E.g. --weight-decay 1e-4",
         TUNE),
    Flag("batch_size", int, 128, "Fine-tuning/eval batch size. E.g. --batch-size 128", TUNE),
    Flag("distill", Optional[bool], None, "Fine-tune with logit distillation from the uncompressed model (default: "
         "on, except with --at-init). Measured: ResNet-56 l1 0.33, 4 min on one core, 3 seeds: +2.4 points top-1 "
         "over plain training (benchmarks/distill_default.py).", TUNE, ("--distill/--no-distill",)),
    Flag("at_init", bool, False, "Score and prune a randomly re-initialised copy (seeded by --seed), then train the "
         "pruned network from scratch for --epochs. E.g. --at-init --epochs 30 --lr 0.1", TUNE, ("--at-init",)),
    Flag("dist_timeout", float, 1800.0, "Under torchrun: seconds a process waits for the others before the run fails "
         "(the process group timeout; cover rank 0's compression and export, which the others wait for). E.g. "
         "--dist-timeout 600", TUNE),
    Flag("device", str, "auto", "auto, cpu or cuda (auto: CUDA with AMP when available). E.g. --device cpu", TUNE),
    Flag("seed", int, 0, "Seed for sampling, scoring and fine-tuning. E.g. --seed 0", TUNE),
    Flag("bench_batch", str, "1,32", "Batch sizes for the onnxruntime latency benchmark; 'none' skips it. E.g. "
         "--bench-batch 1,32", BENCH),
    Flag("threads", Optional[int], None, "Threads for every stage: scoring, training, evaluation and onnxruntime "
         "(default: chosen per stage, see compressor/threads.py). E.g. --threads 2", BENCH),
    Flag("bench_repeats", int, 50, "Timed runs per model and batch size. E.g. --bench-repeats 50", BENCH),
    Flag("quantize", str, "auto", "INT8 of both the original and the compressed graph (onnxruntime quantize_static, "
         "QDQ, per-channel, calibrated on --data), verified by top-1, benchmarked beside fp32: auto (when --data is "
         "given), int8 or none. E.g. --quantize none", BENCH),
    Flag("max_accuracy_drop", float, 1.0, "Largest top-1 drop (percentage points) an INT8 graph may have against its "
         "fp32 graph; beyond it sensitive layers stay float. E.g. --max-accuracy-drop 0.5", BENCH),
    Flag("atol", float, 1e-4, "Max |PyTorch - onnxruntime| accepted. E.g. --atol 1e-4", BENCH),
    Flag("out", Optional[Path], None, "Output folder (default: a new folder beside the model). E.g. --out "
         "runs/r56-l1", OUT),
    Flag("overwrite", bool, False, "Replace outputs already in --out.", OUT, ("--overwrite",)),
    Flag("json_output", bool, False, "Print report.json to stdout instead of the table.", OUT, ("--json",)),
    Flag("debug", bool, False, "Show tracebacks and debug logs.", OUT, ("--debug",)),
)
#: Spellings of method options from before the flags were generated; still accepted, not shown in --help.
LEGACY = {"rank_rule": "tucker_rank_rule", "energy": "tucker_energy", "tau": "tucker_tau",
          "latency_aware": "tucker_latency_aware"}
_KINDS = {"bool": Optional[bool], "int": Optional[int], "float": Optional[float], "str": Optional[str],
          "float|str": Optional[str]}


def _parameter(name: str, kind: Any, default: Any, option: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])


def _method_parameters() -> list[inspect.Parameter]:
    """``--<method>-<option>`` for every option of every registered method and of chains."""
    params = []
    for cls in [REGISTRY.get(n) for n in REGISTRY.names()] + [Chain]:
        for spec in cls.option_specs():
            option = typer.Option(spec.flag, help=spec.describe().replace("[", "\\["),  # rich markup escape
                                  rich_help_panel=f"{cls.name} options",
                                  show_default=False)
            params.append(_parameter(f"{cls.name}_{spec.name}", _KINDS[spec.kind], None, option))
    for old, new in LEGACY.items():
        kind = Optional[bool] if new == "tucker_latency_aware" else Optional[str]
        params.append(_parameter(old, kind, None, typer.Option(f"--{old.replace('_', '-')}", hidden=True,
                                                                help=f"old spelling of --{new.replace('_', '-')}")))
    return params


def _run_parameters() -> list[inspect.Parameter]:
    model = inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        Path, typer.Argument(help="Checkpoint or state_dict (.pt/.pth/.th), or an ONNX graph (.onnx, converted with "
                                  "onnx2torch); e.g. resnet56.th")])
    params = [model]
    for flag in RUN_FLAGS:
        option = typer.Option(*flag.decls, help=flag.help, rich_help_panel=flag.panel, hidden=flag.hidden)
        params.append(_parameter(flag.name, flag.kind, flag.default, option))
    return params


def _value(spec: OptionSpec, text: Any) -> Any:
    """CLI text of a ``float | str`` option (``--cmi-kernel-width 2.5`` or ``median``) as the dataclass expects."""
    if spec.kind != "float|str" or text is None or text in spec.choices:
        return text
    try:
        return float(text)
    except ValueError:
        return text


def method_options(given: dict[str, Any]) -> dict[str, Any]:
    """The method options the user set (unset flags keep the method's own defaults), legacy spellings mapped."""
    specs = {f"{cls.name}_{s.name}": s for cls in [REGISTRY.get(n) for n in REGISTRY.names()] + [Chain]
             for s in cls.option_specs()}
    out = {}
    for key, value in given.items():
        key = LEGACY.get(key, key)
        if value is not None:
            out[key] = _value(specs[key], value)
    return out


def parse_round_to(text: Any) -> int | str:
    """``--round-to``: ``auto`` or an integer (validated, >= 1, by the config); anything else is a one-line error."""
    value = str(text).strip().lower()
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--round-to must be an integer >= 1 or auto, e.g. --round-to 16; got {text!r}") from None


def compress_command(**kw: Any) -> None:
    """Compress a trained PyTorch CNN into a smaller, faster, verified ONNX graph."""
    run_names = {f.name for f in RUN_FLAGS} | {"model"}
    method_values = method_options({k: v for k, v in kw.items() if k not in run_names})
    debug, json_output = kw.pop("debug"), kw.pop("json_output")
    setup_logging(debug)
    options = {k: v for k, v in kw.items() if k in run_names - {"model", "data", "eval_data", "normalize", "out",
                                                                  "bench_batch", "ignore_layer"}}
    code, result = run_guarded(lambda: _compress(kw, options, method_values), debug=debug)
    if result is not None and getattr(result, "main", True):  # other ranks of a distributed run print nothing
        from .report import print_table, to_json

        if json_output:
            typer.echo(to_json(result.report), nl=False)
        else:
            print_table(result.report)
            typer.echo(f"wrote {', '.join(sorted(result.files))} to {result.out_dir}", err=True)
    if code == 130:
        typer.echo("no output was written", err=True)
    leave_if_failed(code)  # a failed distributed run: exit now with the code every rank agreed on
    raise typer.Exit(code)


def _compress(kw: dict[str, Any], options: dict[str, Any], method_values: dict[str, Any]) -> Any:
    from .api import compress, default_out_dir

    options.update(bench_batches=parse_bench_batches(kw["bench_batch"]), ignore_layers=tuple(kw["ignore_layer"] or ()),
                   method_options=method_values, round_to=parse_round_to(kw["round_to"]))
    if options["target"] is None:
        options.pop("target")
    name = options.get("target", options["target_latency"] and f"latency{options['target_latency']:g}")
    out = kw["out"] if kw["out"] is not None else default_out_dir(kw["model"], options["method"], name or 0.33)
    return compress(kw["model"], data=kw["data"], eval_data=kw["eval_data"], normalize=kw["normalize"], out=out,
                    command=sys.argv[1:], **options)


def build_app() -> typer.Typer:
    """The ``compress MODEL`` app, its parameters generated from :data:`RUN_FLAGS` and the methods' options."""
    params = _run_parameters() + _method_parameters()
    command = _with_signature(compress_command, params)
    app = make_app(rich_markup_mode="rich")
    app.command(help=f"Compress a trained PyTorch CNN into a smaller, faster, verified ONNX graph.\n\n{EXAMPLE}\n\n"
                     "Subcommands: compress methods | compress inspect MODEL | compress bench A.onnx [B.onnx ...] | "
                     "compress distill DATA | compress stability MODEL | compress slt --arch ARCH")(
        command)
    return app


def _with_signature(fn: Any, params: list[inspect.Parameter]) -> Any:
    def command(**kw: Any) -> None:
        fn(**kw)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = fn.__doc__
    return command


def build_tools() -> typer.Typer:
    """The subcommands: ``methods``, ``inspect``, ``bench``, ``distill``, ``stability``, ``slt``."""
    tools = make_app()
    methods_cmd.register(tools)
    inspect_cmd.register(tools)
    bench_cmd.register(tools)
    distill_cmd.register(tools)
    stability_cmd.register(tools)
    slt_cmd.register(tools)
    return tools


app = build_app()
tools = build_tools()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``compress``): a subcommand name first runs it, anything else compresses."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in SUBCOMMANDS:
        tools(args, prog_name="compress")
    else:
        app(args, prog_name="compress")


if __name__ == "__main__":  # pragma: no cover
    main()
