"""The public API: :func:`compress` chains the pipeline's stages and writes the outputs atomically.

The CLI (:mod:`compressor.cli`) only maps flags onto this call; each stage is public in :mod:`compressor.pipeline`
and :mod:`compressor.deploy`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from . import pipeline as stages
from . import report as report_mod
from .config import CompressConfig
from .deploy import benchmark, check_runtime, export_verify, quantize
from .distributed import Dist
from .errors import InputError, OutputError
from .io import LoadedModel, atomic_save, check_writable_dir, compressed_payload, publish, staging
from .methods import build_method, list_methods  # noqa: F401 - list_methods is re-exported by compressor/__init__

OUTPUT_FILES = ("original.onnx", "compressed.onnx", "original.int8.onnx", "compressed.int8.onnx", "compressed.pt",
                "report.json", "report.md")


@dataclass
class CompressionResult:
    """What :func:`compress` returns: the compressed model, the original, the report, and where files went.

    ``main`` is False on the other processes of a distributed run: they wrote nothing (``out_dir`` None) and hold
    rank 0's report."""

    model: nn.Module
    original: nn.Module
    report: dict[str, Any]
    out_dir: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    main: bool = True


def default_out_dir(model_path: Path, method: str, target: float | str) -> Path:
    """A new folder beside the model: ``<stem>-<method>-<target>``, suffixed ``-2``, ``-3``... when taken."""
    label = f"{target:g}" if isinstance(target, (int, float)) else target
    base = model_path.parent / f"{model_path.stem}-{method}-{label}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that is a file, holds outputs (without ``overwrite``) or would overwrite an input."""
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


def _config(config: CompressConfig | None, options: dict[str, Any]) -> CompressConfig:
    unknown = set(options) - set(CompressConfig.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}")
    return replace(config or CompressConfig(), **options).validate()


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

    Under ``torchrun`` (several processes) the fine-tuning is distributed: see :mod:`compressor.distributed`.
    """
    if options.get("target") is not None and options.get("target_latency") is not None:
        raise InputError("give --target or --target-latency, not both")
    arch, trust_pickle = options.pop("arch", None), bool(options.pop("trust_pickle", False))
    arch_kwargs = options.pop("arch_kwargs", None)
    overwrite, command = bool(options.pop("overwrite", False)), options.pop("command", None)
    cfg = _config(config, options)
    method = build_method(cfg.method, cfg.method_options)  # unknown method or option: fail before any work
    check_runtime()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        check_out(out_dir, [Path(p) for p in (model, data, eval_data) if isinstance(p, (str, os.PathLike))],
                  overwrite)
    if distributed.launched():
        distributed.check_supported(method, cfg)
    where = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        watch = stages.Stopwatch()
        with watch.stage("load"):
            loaded = stages.load(model, arch=arch, trust_pickle=trust_pickle, arch_kwargs=arch_kwargs)
            prepared = stages.prepare(loaded, data, eval_data, normalize=normalize, cfg=cfg, method=method)
        return _run(loaded, prepared, method, cfg, out_dir, watch, command, where)
    finally:
        distributed.teardown(where)


@dataclass
class _Tuned:
    """What the compress/recalibrate/train stages leave for deployment."""

    compressed: stages.Compressed
    recalibrated: stages.Recalibrated
    trained: stages.Trained | None
    model: nn.Module
    records: list[dict[str, Any]]
    method_report: dict[str, Any]
    accuracy: float | None
    reconstruction: dict[str, Any]


def _compress(original: nn.Module, prepared: stages.Prepared, method: Any, cfg: CompressConfig,
              device: torch.device, watch: stages.Stopwatch) -> tuple[stages.Compressed, dict[str, Any]]:
    with watch.stage("compress"):
        compressed = stages.compress_model(original, method, prepared, cfg, device)
    with watch.stage("reconstruct"):
        refit = stages.reconstruct(compressed, original, prepared, cfg)
    return compressed, refit


def _compress_on_main(original: nn.Module, prepared: stages.Prepared, method: Any, cfg: CompressConfig,
                      watch: stages.Stopwatch, where: Dist) -> tuple[stages.Compressed, dict[str, Any]]:
    """Distributed: rank 0 compresses (and reconstructs); the others replay its records on their copy of the
    original; then every rank takes rank 0's weights."""
    def work() -> tuple[stages.Compressed, dict[str, Any]]:
        compressed, refit = _compress(original, prepared, method, cfg, where.device, watch)
        if compressed.callbacks:
            raise InputError(f"--method {cfg.method} acts during fine-tuning, which DistributedDataParallel does "
                             "not follow; run it in one process (without torchrun)")
        return compressed, refit

    def share(done: tuple[stages.Compressed, dict[str, Any]]) -> dict[str, Any]:
        return {"records": done[0].records, "report": done[0].report, "target": done[0].target, "refit": done[1]}

    mine, shared = where.main_only(work, share)
    if mine is not None:
        compressed, refit = mine
    else:
        model = where.replica(original, shared["records"], prepared.example)
        compressed = stages.Compressed(model, method, shared["records"], shared["report"], [], shared["target"])
        refit = shared["refit"]
    where.broadcast_state(compressed.model)
    return compressed, refit


def _compress_and_train(original: nn.Module, prepared: stages.Prepared, method: Any, cfg: CompressConfig,
                        device: torch.device, watch: stages.Stopwatch, where: Dist | None = None) -> _Tuned:
    compressed, refit = (_compress(original, prepared, method, cfg, device, watch) if where is None
                         else _compress_on_main(original, prepared, method, cfg, watch, where))
    with watch.stage("bn_recalib"):
        recal = stages.recalibrate(compressed.model, prepared, cfg, device,
                                   reconstructed=bool(refit.get("refitted")), dist=where)
    if not cfg.trains:
        return _Tuned(compressed, recal, None, compressed.model, compressed.records, compressed.report, recal.accuracy,
                      refit)
    with watch.stage("finetune"):
        trained = stages.train(compressed, original, prepared, cfg, device, dist=where)
    with watch.stage("evaluate_finetuned"):
        accuracy = stages.top1(trained.model, prepared, cfg, device, dist=where)
    return _Tuned(compressed, recal, trained, trained.model, trained.records, trained.report, accuracy, refit)


def _deploy(original: nn.Module, tuned: _Tuned, prepared: stages.Prepared, cfg: CompressConfig,
            accuracy_original: float | None, stage_dir: Path, watch: stages.Stopwatch) -> tuple[Any, Any, Any]:
    """Export and verify both fp32 graphs, quantise both to INT8 when asked, benchmark every graph in one run."""
    exported = export_verify({"original": original, "compressed": tuned.model}, prepared.example,
                             prepared.parity_inputs(), folder=stage_dir, atol=cfg.atol, threads=cfg.threads)
    watch.timings.update(exported.seconds)
    quantized, paths = None, dict(exported.paths)
    if prepared.quantizes(cfg):
        with watch.stage("quantize"):
            calib, evals = prepared.numpy_batches()
            quantized = quantize(exported, calib, evals, max_drop=cfg.max_accuracy_drop / 100.0, threads=cfg.threads,
                                 required=cfg.quantize == "int8")
        paths.update(quantized.paths)
    bench = None
    if cfg.bench_batches:
        with watch.stage("benchmark"):
            bench = benchmark(paths, prepared.example, batches=cfg.bench_batches, threads=cfg.threads,
                              device=cfg.device, repeats=cfg.bench_repeats, seed=cfg.seed)
    return exported, quantized, bench


def _report(loaded: LoadedModel, original: nn.Module, tuned: _Tuned, prepared: stages.Prepared, method: Any,
            cfg: CompressConfig, deployed: tuple[Any, Any, Any], accuracy_original: float | None,
            watch: stages.Stopwatch, command: list[str] | None, where: Dist | None) -> dict[str, Any]:
    exported, quantized, bench = deployed
    example, model = prepared.example, tuned.model
    section = report_mod.method_section(
        tuned.compressed, tuned.method_report, cfg,
        achieved=stages.achieved(original, model, example, compressed_metric(cfg, method)),
        bn_recalib_images=tuned.recalibrated.images)
    sizes, deflated = exported.onnx_bytes(), exported.deflated_bytes()
    return report_mod.assemble(
        tool={"name": "compressor", "command": command},
        model={"path": loaded.source, "arch": loaded.arch, "input_shape": list(example.shape[1:]),
               "num_classes": prepared.num_classes, **loaded.details},
        method=section,
        original={**stages.sizes(original, example), "onnx_bytes": sizes["original"],
                  "onnx_deflated_bytes": deflated["original"], "accuracy": accuracy_original},
        compressed={**stages.sizes(model, example), "onnx_bytes": sizes["compressed"],
                    "onnx_deflated_bytes": deflated["compressed"], "accuracy": tuned.accuracy,
                    "accuracy_before_finetune": tuned.recalibrated.accuracy,
                    "accuracy_before_bn_recalib": tuned.recalibrated.accuracy_stale},
        parity=exported.parity, int8=quantized.section() if quantized is not None else None, bench=bench,
        reconstruction=tuned.reconstruction,
        trained=tuned.trained, cfg=cfg, watch=watch, layers=report_mod.layer_table(original, model),
        distributed=None if where is None else where.section(batch_size=cfg.batch_size, lr=cfg.lr,
                                                             trained=tuned.trained is not None))


def _run(loaded: LoadedModel, prepared: stages.Prepared, method: Any, cfg: CompressConfig, out_dir: Path | None,
         watch: stages.Stopwatch, command: list[str] | None, where: Dist | None = None) -> CompressionResult:
    """Every stage after loading; all files are staged and published only at the very end (by rank 0 alone in a
    distributed run, whose outcome every rank shares)."""
    device = stages.resolve_device(cfg.device) if where is None else where.device
    torch.manual_seed(cfg.seed)
    original = loaded.model
    with watch.stage("evaluate_original"):
        accuracy_original = stages.top1(original, prepared, cfg, device, dist=where)
        original.cpu()
    tuned = _compress_and_train(original, prepared, method, cfg, device, watch, where)
    original.cpu().eval()
    tuned.model.cpu().eval()
    if where is None:
        return _deploy_and_write(loaded, original, tuned, prepared, method, cfg, out_dir, watch, command,
                                 accuracy_original, None)

    def deploy() -> CompressionResult:
        return _deploy_and_write(loaded, original, tuned, prepared, method, cfg, out_dir, watch, command,
                                 accuracy_original, where)

    def share(done: CompressionResult) -> dict[str, Any]:
        return done.report

    mine, report = where.main_only(deploy, share)
    return mine if mine is not None else CompressionResult(tuned.model, original, report, None, {}, main=False)


def _deploy_and_write(loaded: LoadedModel, original: nn.Module, tuned: _Tuned, prepared: stages.Prepared,
                      method: Any, cfg: CompressConfig, out_dir: Path | None, watch: stages.Stopwatch,
                      command: list[str] | None, accuracy_original: float | None,
                      where: Dist | None) -> CompressionResult:
    """Export, verify, quantise, benchmark, report; with ``out_dir``, stage the files and publish them at once."""
    with staging(out_dir, prefix=".compressor-stage-") as stage_dir:
        deployed = _deploy(original, tuned, prepared, cfg, accuracy_original, stage_dir, watch)
        report = _report(loaded, original, tuned, prepared, method, cfg, deployed, accuracy_original, watch, command,
                         where)
        files: dict[str, Path] = {}
        if out_dir is not None:
            with watch.stage("write"):
                _write(stage_dir, tuned.model, loaded, prepared, tuned.records, report)
                files = publish(stage_dir, out_dir, OUTPUT_FILES)
    return CompressionResult(tuned.model, original, report, out_dir, files)


def compressed_metric(cfg: CompressConfig, method: Any) -> str:
    """The metric ``--target`` counts in: the user's, else the method's default."""
    return cfg.target_metric or method.default_metric


def _write(stage_dir: Path, model: nn.Module, loaded: LoadedModel, prepared: stages.Prepared,
           records: list[dict[str, Any]], report: dict[str, Any]) -> None:
    norm = prepared.normalization
    payload = compressed_payload(
        model, arch=loaded.arch, input_shape=tuple(prepared.example.shape[1:]), transforms=records,
        arch_kwargs=loaded.arch_kwargs,
        meta={"num_classes": prepared.num_classes, "method": report["method"]["name"],
              "target": report["method"]["target"],
              "normalize": None if norm is None else {"mean": list(norm.mean), "std": list(norm.std)},
              "accuracy": report["compressed"]["accuracy"]},
    )
    atomic_save(lambda p: torch.save(payload, p), stage_dir / "compressed.pt")
    atomic_save(lambda p: p.write_text(report_mod.to_markdown(report)), stage_dir / "report.md")
    atomic_save(lambda p: p.write_text(report_mod.to_json(report)), stage_dir / "report.json")
