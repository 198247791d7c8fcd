"""The public API: :func:`compress` runs the whole job (load, prune, validate, fine-tune, export, verify, benchmark).

The CLI (:mod:`compressor.cli`) only maps flags onto this call.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import models
from . import report as report_mod
from .config import CompressConfig
from .errors import DataError, InputError, OutputError, ValidationError
from .finetune import evaluate, finetune, recalibrate_bn
from .io import LoadedModel, atomic_save, check_writable_dir, compressed_payload, load_model
from .methods import cmi as _cmi  # noqa: F401 - registers --method cmi
from .methods import mipp as _mipp  # noqa: F401 - registers --method mipp
from .methods import tucker as _tucker  # noqa: F401 - registers --method tucker
from .metrics import count_filters, count_macs, count_params
from .pruning import engine
from .transforms import (  # noqa: F401 - list_methods is re-exported by compressor/__init__
    TransformContext, check_method_options, default_metric, list_methods, plan, requires_data)

log = logging.getLogger("compressor")
OUTPUT_FILES = ("original.onnx", "compressed.onnx", "compressed.pt", "report.json", "report.md")


@dataclass
class CompressionResult:
    """What :func:`compress` returns: the compressed model, the original, the report, and where files went."""

    model: nn.Module
    original: nn.Module
    report: dict[str, Any]
    out_dir: Path | None
    files: dict[str, Path] = field(default_factory=dict)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to PyTorch; use --device auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _stats(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    return {"params": count_params(model), "macs": count_macs(model, example), "filters": count_filters(model)}


def _load_data(spec: Any, name: str) -> data_mod.ImageDataset | None:
    if spec is None:
        return None
    return spec if isinstance(spec, data_mod.ImageDataset) else data_mod.load_dataset(str(spec))


def _prepare(loaded: LoadedModel, train: Any, test: Any, cfg: CompressConfig) -> tuple[Any, Any, torch.Tensor, int]:
    """Load the data, fix the input shape, and check data and model fit each other before any work."""
    train_ds, test_ds = _load_data(train, "--data"), _load_data(test, "--eval-data")
    shape = loaded.input_shape or next((ds.image_shape for ds in (train_ds, test_ds) if ds is not None), None)
    if shape is None:
        raise InputError(f"cannot tell the input shape of {loaded.arch}; pass --data so it can be read from images")
    example = torch.zeros((1, *shape))
    try:
        with torch.no_grad():
            out = loaded.model.eval()(example)
    except Exception as exc:  # noqa: BLE001 - any forward failure means the model cannot take this input
        raise DataError(f"the model does not accept inputs of shape {tuple(shape)}: {str(exc).splitlines()[0]}") from None
    if out.ndim != 2:
        raise InputError(f"the model's output has shape {tuple(out.shape)}; compressor expects (batch, classes) logits")
    num_classes = int(out.shape[1])
    for ds, flag in ((train_ds, "--data"), (test_ds, "--eval-data")):
        if ds is not None:
            data_mod.check_dataset(ds, input_shape=tuple(shape), num_classes=num_classes, name=flag)
    if requires_data(plan(cfg.method)) and train_ds is None:
        raise InputError(f"--method {cfg.method} needs calibration data; pass --data")
    if cfg.epochs > 0 and train_ds is None:
        raise InputError(f"--epochs {cfg.epochs} needs training data; pass --data (or use --epochs 0)")
    return train_ds, test_ds, example, num_classes


def _apply_method(original: nn.Module, example: torch.Tensor, calib: Any, num_classes: int, cfg: CompressConfig,
                  device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Run the method's transforms in order (each on a copy); report what each chose and the overall ratio."""
    steps = plan(cfg.method)
    metric = cfg.target_metric or default_metric(steps)
    ctx = TransformContext(example=example, num_classes=num_classes, cfg=cfg, device=device, original=original,
                           calib=calib, metric=metric)
    model, records, info = original, [], {}
    for step in steps:
        result = step.apply(model, ctx)
        model = result.model
        records.append(result.record)
        info.update(result.info)
    total = engine.measure(original, example, metric)
    achieved = 1.0 - engine.measure(model, example, metric) / total
    return model.eval(), {"name": cfg.method, "target": cfg.target, "target_metric": metric, "achieved": achieved,
                          "stages": [r["kind"] for r in records], **info, "records": records}


def _loader(ds: Any, cfg: CompressConfig, normalize: Any, *, train: bool) -> Any:
    augment = cfg.augment if cfg.augment is not None else tuple(ds.image_shape[1:]) == (32, 32)
    return data_mod.make_loader(ds, batch_size=cfg.batch_size, normalize=normalize, shuffle=train,
                                augment=augment and train, seed=cfg.seed, drop_last=False)


def _eval_inputs(test_ds: Any, train_ds: Any, normalize: Any, example: torch.Tensor, n: int = 256) -> list:
    """Real images for the parity check: eval data first, else training data, else seeded noise."""
    source = test_ds if test_ds is not None else train_ds
    if source is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.randn((32, *example.shape[1:]), generator=gen)]
    subset = source.subset(list(range(min(n, len(source)))))
    return [x for x, _ in data_mod.make_loader(subset, batch_size=64, normalize=normalize)]


def _export_verify_bench(original: nn.Module, pruned: nn.Module, example: torch.Tensor, inputs: list,
                         cfg: CompressConfig, stage_dir: Path, watch: _Stopwatch) -> dict[str, Any]:
    """Export both models, check parity (a failure is fatal: never emit a broken model), benchmark both."""
    from exporters import benchmark_latency, check_parity, export_onnx

    paths = {"original": stage_dir / "original.onnx", "compressed": stage_dir / "compressed.onnx"}
    with watch.stage("export"):
        for name, model in (("original", original), ("compressed", pruned)):
            export_onnx(model, paths[name], example)
    with watch.stage("parity"):
        parity = check_parity(pruned, paths["compressed"], inputs, atol=cfg.atol)
        if not parity.ok:
            raise ValidationError(
                f"the compressed model's ONNX export disagrees with PyTorch (max abs diff {parity.max_abs_diff:.3g} "
                f"> atol {cfg.atol:g} or top-1 agreement {100 * parity.top1_agreement:.1f}% < 100%); nothing was "
                "written. Re-run with --debug and report it, or loosen --atol if the difference is benign"
            )
    result: dict[str, Any] = {"parity": parity.to_dict(), "onnx_bytes": {k: p.stat().st_size for k, p in paths.items()}}
    if cfg.bench_batches:
        with watch.stage("benchmark"):
            bench = benchmark_latency({k: str(p) for k, p in paths.items()}, input_shape=tuple(example.shape[1:]),
                                      batch_sizes=cfg.bench_batches, threads=cfg.threads,
                                      device=cfg.device,
                                      repeats=cfg.bench_repeats, seed=cfg.seed)
        bench_dict = bench.to_dict()
        latency = {}
        for batch in cfg.bench_batches:
            stats = bench.latency[batch]
            latency[str(batch)] = {"original": asdict_stats(stats["original"]),
                                   "compressed": asdict_stats(stats["compressed"]),
                                   "speedup": round(bench.speedup(batch, "original", "compressed"), 4)}
        result["latency"] = latency
        result["benchmark"] = {k: v for k, v in bench_dict.items() if k != "latency"}
    return result


def asdict_stats(stats: Any) -> dict[str, float]:
    from dataclasses import asdict

    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(stats).items()}


def _check_runtime() -> None:
    """onnxruntime must be importable, and only one of onnxruntime / onnxruntime-gpu installed (they clash)."""
    import exporters
    from exporters.errors import RuntimeConflictError, RuntimeMissingError

    info = exporters.runtime_info()
    if info["conflict"]:
        raise RuntimeConflictError(tuple(info["packages"]))
    if info["onnxruntime_version"] is None:
        raise RuntimeMissingError()


def default_out_dir(model_path: Path, method: str, target: float) -> Path:
    """A new folder beside the model: ``<stem>-<method>-<target>``, suffixed ``-2``, ``-3``... when taken."""
    base = model_path.parent / f"{model_path.stem}-{method}-{target:g}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory")
    clashes = [out / f for f in OUTPUT_FILES if (out / f).exists()]
    if clashes and not overwrite:
        raise OutputError(f"--out {out} already holds {clashes[0].name}; choose a new --out or pass --overwrite")
    resolved = {p.resolve() for p in inputs}
    for name in OUTPUT_FILES:
        if (out / name).resolve() in resolved:
            raise OutputError(f"--out {out} would overwrite the input {out / name}; choose another --out")


def _nearest_existing(path: Path) -> Path:
    """The closest existing ancestor of ``path``: staging there keeps the final moves on one filesystem."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _publish(stage_dir: Path, out: Path) -> dict[str, Path]:
    """Move finished files from the staging folder into ``out`` (each move is an atomic rename)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in OUTPUT_FILES:
        src = stage_dir / name
        if src.exists():
            os.replace(src, out / name)
            files[name] = out / name
    return files


def compress(
    model: str | os.PathLike[str] | nn.Module,
    *,
    data: Any = None,
    eval_data: Any = None,
    normalize: str = "none",
    out: str | os.PathLike[str] | None = None,
    config: CompressConfig | None = None,
    **options: Any,
) -> CompressionResult:
    """Compress ``model`` and return the compressed model with a report of everything measured.

    Parameters
    ----------
    model : path or nn.Module
        A checkpoint (with ``arch=`` in ``options``, see :func:`compressor.io.load_model`) or a module.
    data, eval_data : path spec or ImageDataset, optional
        Calibration/fine-tuning data and evaluation data (see :func:`compressor.data.load_dataset`).
    normalize : str
        ``imagenet``, ``cifar``, ``none`` or ``m1,m2,m3/s1,s2,s3``; applied to images scaled to [0, 1].
    out : path, optional
        Folder for ``original.onnx``, ``compressed.onnx``, ``compressed.pt``, ``report.json``, ``report.md``.
        Files are staged in a temporary folder and moved in only when everything succeeded. None writes nothing.
    config : CompressConfig, optional
        All options; keyword ``options`` override its fields (plus ``arch``, ``trust_pickle``, ``overwrite``).

    Examples
    --------
    >>> result = compress("resnet56.th", arch="resnet56", data="train.npz", eval_data="test.npz",
    ...                   normalize="imagenet", method="l1", target=0.33, epochs=2, out="runs/r56-l1")  # doctest: +SKIP
    >>> result.report["compressed"]["macs"]  # doctest: +SKIP
    """
    arch = options.pop("arch", None)
    trust_pickle = bool(options.pop("trust_pickle", False))
    overwrite = bool(options.pop("overwrite", False))
    command = options.pop("command", None)
    unknown = set(options) - set(CompressConfig.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}")
    cfg = replace(config or CompressConfig(), **options).validate()
    plan(cfg.method)  # unknown method: fail before any work
    check_method_options(cfg.method, cfg.method_options)
    _check_runtime()
    normalization = data_mod.parse_normalize(normalize)
    watch = _Stopwatch()
    out_dir = Path(out) if out is not None else None
    inputs = [Path(p) for p in (model, data, eval_data) if isinstance(p, (str, os.PathLike))]
    if out_dir is not None:
        _check_out(out_dir, inputs, overwrite)
    with watch.stage("load"):
        if isinstance(model, nn.Module):
            loaded = LoadedModel(model.eval(), arch or type(model).__name__, None, "<in-memory module>")
        else:
            loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
        train_ds, test_ds, example, num_classes = _prepare(loaded, data, eval_data, cfg)
    return _run(loaded, train_ds, test_ds, example, num_classes, normalization, cfg, out_dir, watch,
                command=command)


def _run(loaded: LoadedModel, train_ds: Any, test_ds: Any, example: torch.Tensor, num_classes: int,
         normalization: Any, cfg: CompressConfig, out_dir: Path | None, watch: _Stopwatch,
         command: list[str] | None) -> CompressionResult:
    """Everything after loading; all files are staged and published only at the very end."""
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    original = loaded.model
    eval_loader = _loader(test_ds, cfg, normalization, train=False) if test_ds is not None else None
    with watch.stage("evaluate_original"):
        acc_original = evaluate(original, eval_loader, device=device) if eval_loader else None
        original.cpu()
    calib = None
    if train_ds is not None:
        calib_ds = data_mod.calibration_subset(train_ds, cfg.calib_samples, seed=cfg.seed)
        calib = _loader(calib_ds, replace(cfg, augment=False), normalization, train=False)
    source = models.reinitialise(original, seed=cfg.seed) if cfg.at_init else original
    with watch.stage("compress"):
        pruned, method_info = _apply_method(source, example, calib, num_classes, cfg, device)
    method_info["at_init"] = cfg.at_init
    acc_stale = None
    if train_ds is not None and cfg.bn_recalib > 0:
        if eval_loader is not None:
            with watch.stage("evaluate_pruned"):
                acc_stale = evaluate(pruned, eval_loader, device=device)
        with watch.stage("bn_recalib"):
            bn_ds = data_mod.calibration_subset(train_ds, cfg.bn_recalib, seed=cfg.seed + 1)
            method_info["bn_recalib_images"] = recalibrate_bn(
                pruned, _loader(bn_ds, replace(cfg, augment=False), normalization, train=False), device=device)
    with watch.stage("evaluate_pruned"):
        acc_pruned = evaluate(pruned, eval_loader, device=device) if eval_loader else None
    tuned = None
    if cfg.epochs > 0:
        with watch.stage("finetune"):
            train_loader = _loader(train_ds, cfg, normalization, train=True)
            if cfg.method_options.get("tucker_adaptive"):  # issue 5: ranks train too; record and ratio follow
                pruned, tuned = _adaptive_finetune(pruned, original, train_loader, eval_loader, example, cfg, device,
                                                   method_info)
            else:
                tuned = finetune(pruned, train_loader, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                                 weight_decay=cfg.weight_decay, device=device,
                                 teacher=original if cfg.distill else None, seed=cfg.seed, eval_loader=eval_loader)
        with watch.stage("evaluate_finetuned"):
            acc_final = evaluate(pruned, eval_loader, device=device) if eval_loader else None
    else:
        acc_final = acc_pruned
    original.cpu().eval()
    pruned.cpu().eval()
    parent = _nearest_existing(out_dir) if out_dir is not None else None
    stage_dir = Path(tempfile.mkdtemp(prefix=".compressor-stage-", dir=parent))
    try:
        inputs = _eval_inputs(test_ds, train_ds, normalization, example)
        verified = _export_verify_bench(original, pruned, example, inputs, cfg, stage_dir, watch)
        report = _build_report(loaded, original, pruned, example, num_classes, cfg, method_info, verified,
                               (acc_original, acc_stale, acc_pruned, acc_final), tuned, watch, command)
        files: dict[str, Path] = {}
        if out_dir is not None:
            with watch.stage("write"):
                _write(stage_dir, pruned, loaded, example, num_classes, method_info, report, normalization)
                report["timings"] = dict(watch.timings)
                atomic_save(lambda p: p.write_text(report_mod.to_json(report)), stage_dir / "report.json")
                atomic_save(lambda p: p.write_text(report_mod.to_markdown(report)), stage_dir / "report.md")
                files = _publish(stage_dir, out_dir)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return CompressionResult(pruned, original, report, out_dir, files)


def _adaptive_finetune(model: nn.Module, original: nn.Module, loader: Any, eval_loader: Any, example: torch.Tensor,
                       cfg: CompressConfig, device: torch.device, method_info: dict[str, Any]) -> tuple[nn.Module, Any]:
    """``--tucker-adaptive``: rank-adaptive fine-tuning. The ranks change, so the saved tucker record, the report's
    ranks and the achieved ratio are replaced by what was trained (``load_compressed`` must rebuild that)."""
    from .methods.tucker_adaptive import AdaptiveConfig, adaptive_finetune

    if "tucker" not in method_info["stages"]:
        raise InputError(f"--tucker-adaptive needs a method with tucker (tucker, l1+tucker...); got {cfg.method}")
    if cfg.optimizer != "sgd" or cfg.distill:
        raise InputError("--tucker-adaptive trains with SGD and without distillation; drop --optimizer/--distill")
    stage, info, metric = method_info["stages"].index("tucker"), method_info["tucker"], method_info["target_metric"]
    config = AdaptiveConfig(epochs=cfg.epochs, lr=cfg.lr, tau=info["tau"], period=info["period"],
                            weight_decay=cfg.weight_decay, seed=cfg.seed,
                            metric=metric if info["rank_rule"] == "target" else None)
    result = adaptive_finetune(model, loader, record=method_info["records"][stage], config=config, device=device,
                               eval_loader=eval_loader)
    method_info["records"][stage] = result.record
    info.update(final_ranks=result.record["layers"], trajectory=result.trajectory, densified=result.densified)
    method_info["achieved"] = 1.0 - (engine.measure(result.model.cpu(), example, metric)
                                     / engine.measure(original, example, metric))
    return result.model, result


def _write(stage_dir: Path, pruned: nn.Module, loaded: LoadedModel, example: torch.Tensor, num_classes: int,
           method_info: dict[str, Any], report: dict[str, Any], normalization: Any) -> None:
    payload = compressed_payload(
        pruned, arch=loaded.arch, input_shape=tuple(example.shape[1:]),
        transforms=method_info["records"],
        meta={"num_classes": num_classes, "method": method_info["name"], "target": method_info["target"],
              "normalize": None if normalization is None else {"mean": list(normalization.mean),
                                                                "std": list(normalization.std)},
              "accuracy": report["compressed"]["accuracy"]},
    )
    atomic_save(lambda p: torch.save(payload, p), stage_dir / "compressed.pt")


def _build_report(loaded: LoadedModel, original: nn.Module, pruned: nn.Module, example: torch.Tensor,
                  num_classes: int, cfg: CompressConfig, method_info: dict[str, Any], verified: dict[str, Any],
                  accuracies: tuple[Any, Any, Any, Any], tuned: Any, watch: _Stopwatch,
                  command: list[str] | None) -> dict[str, Any]:
    acc_original, acc_stale, acc_pruned, acc_final = accuracies
    info = {k: v for k, v in method_info.items() if k != "records"}
    return {
        "tool": {"name": "compressor", "command": command},
        "model": {"path": loaded.source, "arch": loaded.arch, "input_shape": list(example.shape[1:]),
                  "num_classes": num_classes},
        "method": info,
        "original": {**_stats(original, example), "onnx_bytes": verified["onnx_bytes"]["original"],
                     "accuracy": acc_original},
        "compressed": {**_stats(pruned, example), "onnx_bytes": verified["onnx_bytes"]["compressed"],
                       "accuracy": acc_final, "accuracy_before_finetune": acc_pruned,
                       "accuracy_before_bn_recalib": acc_stale},
        "parity": verified["parity"],
        "latency": verified.get("latency", {}),
        "benchmark": verified.get("benchmark", {}),
        "finetune": {"epochs": cfg.epochs, "device": str(getattr(tuned, "device", "")) or None,
                     "amp": getattr(tuned, "amp", None), "history": list(getattr(tuned, "history", []) or [])},
        "timings": dict(watch.timings),
        "layers": report_mod.layer_table(original, pruned),
        "options": cfg.to_dict(),
        "conventions": {"macs": report_mod.MAC_CONVENTION, "target": report_mod.TARGET_CONVENTION,
                        "accuracy": "top-1 on --eval-data, fraction in [0, 1]"},
        "versions": report_mod.versions(),
        "machine": report_mod.machine(),
    }
