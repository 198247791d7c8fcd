"""One ``compress slt`` run: search a strong lottery ticket (or train the weights, the baseline), store, reload, export,
verify, benchmark, report. The method itself is in :mod:`compressor.slt`; this module wires it to the project's data
loading, the one :class:`~compressor.training.Trainer`, the export/parity stage of :mod:`compressor.deploy` and the
onnxruntime benchmark, and writes everything atomically (staged, then moved into ``--out`` only when all succeeded).

Outputs in ``--out``: ``ticket.slt`` (the compact artefact, SLT runs only), ``model.onnx`` (the ticket as a dense
masked network, or the weight-trained network), ``report.json`` and ``report.md``.

Examples
--------
>>> from compressor.slt import SLTConfig
>>> result = run_slt(arch="resnet20", data="train.npz", eval_data="test.npz", normalize="imagenet",
...                  slt=SLTConfig(keep=0.5, freeze=0.7), epochs=2, out="runs/slt")  # doctest: +SKIP
>>> result.report["accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import slt as slt_mod
from . import slt_ticket
from .data import ImageDataset, calibration_subset, check_dataset, load_dataset, make_loader
from .errors import InputError, ValidationError
from .io import check_out_folder, load_model, publish, staging
from .threads import ThreadPolicy
from .evaluation import evaluate, recalibrate_bn
from .training import TrainConfig, Trainer

__all__ = ["OUTPUT_FILES", "SLTRun", "check_out_dir", "render_markdown", "run_slt"]

OUTPUT_FILES = ("ticket.slt", "model.onnx", "report.json", "report.md")
MAX_BUDGET_EPOCHS = 10_000
DENSE_RUNTIME_NOTE = (
    "A dense runtime (onnxruntime here) multiplies the zeros like any other weight: the ticket's ONNX graph has the "
    "source network's shape, so its latency is the source's (measured side by side below), and its raw ONNX bytes are "
    "those of a dense float32 network. What it cannot exploit: the sparsity (neither for speed nor for size) and the "
    "fact that the weights are regenerable from a seed. What the compact artefact exploits: only the mask bits of the "
    "searched weights, the seeds and the BatchNorm statistics are stored (ticket.slt), and the deflated ONNX shows "
    "what generic compression recovers from the zeros. Sparse kernels or hardware that regenerates the weights "
    "on chip (the paper's target) would be needed to turn the sparsity into speed."
)


@dataclass
class SLTRun:
    """What :func:`run_slt` produced: the report, the output folder and the files written."""

    report: dict[str, Any]
    out_dir: Path
    files: dict[str, Path]
    model: nn.Module


def check_out_dir(out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Fail before any work when ``out`` cannot take the outputs (a file, already holding them without
    ``overwrite``, or not writable)."""
    return check_out_folder(out, OUTPUT_FILES, overwrite=overwrite)


def _positive_int(value: Any, flag: str, *, zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero else value >= 1)
    if not ok:
        raise InputError(f"{flag} must be a {'non-negative' if zero else 'positive'} integer; got {value!r}")


def _template(arch: str | None, model: Any, trust_pickle: bool, num_classes: int) -> tuple[nn.Module, str]:
    if model is not None:  # a checkpoint only names the architecture: its weights are never used
        loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
        return loaded.model, arch or loaded.arch
    if arch is None:
        raise InputError("compress slt starts from a random network of an architecture: pass --arch (e.g. --arch "
                         "resnet20) or --model CHECKPOINT")
    return slt_ticket.build_arch(arch, num_classes), arch


def _datasets(data: Any, eval_data: Any, train_images: int | None, eval_images: int,
              seed: int) -> tuple[ImageDataset, ImageDataset, str]:
    if data is None:
        raise InputError("compress slt learns the ticket's scores on images: pass --data (e.g. --data train.npz)")
    train = data if isinstance(data, ImageDataset) else load_dataset(data)
    if train_images is not None:
        train = calibration_subset(train, min(train_images, len(train)), seed=seed)
    if eval_data is not None:
        test = eval_data if isinstance(eval_data, ImageDataset) else load_dataset(eval_data)
        return train, test, f"--eval-data ({len(test)} images)"
    test = calibration_subset(train, min(eval_images, len(train)), seed=seed + 1)
    return train, test, f"{len(test)} images of --data (training images: optimistic)"


def run_slt(*, arch: str | None = None, model: Any = None, data: Any = None, eval_data: Any = None,
            normalize: str = "none", slt: slt_mod.SLTConfig | None = None, train_weights: bool = False,
            epochs: int | None = 10, budget_minutes: float | None = None, lr: float = 0.1, optimizer: str = "sgd",
            weight_decay: float = 5e-4, batch_size: int = 128, train_images: int | None = None,
            eval_images: int = 1000, augment: bool | None = None, bn_recalib: int = 1024, seed: int = 0,
            device: str = "auto", threads: int | None = None, bench_batches: tuple[int, ...] = (1, 32),
            bench_repeats: int = 30, atol: float = 1e-4, out: str | os.PathLike[str] = "slt",
            overwrite: bool = False, trust_pickle: bool = False, progress: bool = True,
            command: list[str] | None = None) -> SLTRun:
    """Search a strong lottery ticket in a seeded random network of ``arch`` (``train_weights=False``), or train the
    weights of the same architecture (the baseline), then store, reload, export, verify and benchmark it.

    ``slt`` holds ``keep``/``freeze``/``freeze_prune``/``distribution``/``init``/seeds (``freeze=0``: the dense source;
    ``freeze_prune=1``: a randomly pruned source). Training: ``epochs`` (or ``budget_minutes``) of the one
    :class:`~compressor.training.Trainer` over ``train_images`` class-balanced images of ``data`` (all by default)
    with a cosine schedule from ``lr``; for a ticket the scores are the only parameters. ``bn_recalib`` images
    re-estimate the BatchNorm statistics of the final ticket (its mask changed during the search). Nothing is written
    unless the whole run succeeded.
    """
    start = time.perf_counter()
    cfg = slt if slt is not None else slt_mod.SLTConfig()
    out_dir = check_out_dir(out, overwrite=overwrite)
    for value, flag, zero in ((eval_images, "--eval-images", False), (bn_recalib, "--bn-recalib", True),
                              (bench_repeats, "--bench-repeats", False)):
        _positive_int(value, flag, zero=zero)
    if train_images is not None:
        _positive_int(train_images, "--train-images")
    if (epochs is None) == (budget_minutes is None):
        raise InputError("give the training budget as --epochs N or --budget-minutes M (one of them)")
    budget = None if budget_minutes is None else 60.0 * budget_minutes
    train_cfg = TrainConfig(epochs=epochs if epochs is not None else MAX_BUDGET_EPOCHS, lr=lr, optimizer=optimizer,
                            weight_decay=weight_decay, seed=seed, budget_seconds=budget)
    from .pipeline import resolve_device

    dev = resolve_device(device)
    train, test, evaluated_on = _datasets(data, eval_data, train_images, eval_images, seed)
    num_classes = int(train.y.max()) + 1
    template, arch_name = _template(arch, model, trust_pickle, num_classes)
    shape, classes = train.image_shape, _check_fit(template, arch_name, train, test)
    do_augment = augment if augment is not None else tuple(shape[1:]) == (32, 32)
    loader = make_loader(train, batch_size=batch_size, normalize=normalize, shuffle=True, augment=do_augment,
                         seed=seed)
    eval_loader = make_loader(test, batch_size=256, normalize=normalize)
    policy = ThreadPolicy(threads)
    net = _reinitialised(template, seed) if train_weights else slt_mod.make_slt(template, cfg)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    with policy.apply("train"):
        trained = Trainer(train_cfg, device=dev, callbacks=[] if train_weights else [slt_mod.MaskChurn()],
                          progress=progress).fit(net, loader, eval_loader=eval_loader)
        net = trained.model
        bn_images = 0
        if bn_recalib and not train_weights:
            subset = calibration_subset(train, min(bn_recalib, len(train)), seed=seed)
            bn_images = recalibrate_bn(net, make_loader(subset, batch_size=256, normalize=normalize))
    deployed = slt_mod.materialize(net) if not train_weights else copy.deepcopy(net).cpu().eval()
    with policy.apply("evaluate"):
        accuracy = evaluate(deployed, eval_loader, device="cpu")
    parity_inputs = [x for x, _ in make_loader(test.subset(list(range(min(256, len(test))))), batch_size=64,
                                               normalize=normalize)]
    report = _report_head(arch_name, cfg, train_weights, command, evaluated_on, len(train), accuracy, classes,
                          trained, trainable, bn_images, train_cfg, do_augment, normalize, str(dev))

    fill = functools.partial(_artefacts, report=report, net=net, deployed=deployed, template=template, arch=arch_name,
                             num_classes=num_classes, shape=shape, inputs=parity_inputs, train_weights=train_weights,
                             start=start, export=dict(atol=atol, threads=threads, batches=bench_batches,
                                                      repeats=bench_repeats, seed=seed))
    files = _publish(out_dir, report, fill)
    return SLTRun(report, out_dir, files, deployed)


def _artefacts(stage: Path, *, report: dict[str, Any], net: nn.Module, deployed: nn.Module, template: nn.Module,
               arch: str, num_classes: int, shape: tuple[int, ...], inputs: list[torch.Tensor], train_weights: bool,
               start: float, export: dict[str, Any]) -> None:
    """Into ``stage``: the ticket (stored, reloaded, checked bit-identical) and the ONNX graph; completes ``report``."""
    if not train_weights:
        report["reload"] = _store_and_reload(net, deployed, stage, arch, num_classes, shape, inputs, template)
        report["layers"] = list(slt_mod.iter_plan_rows(net))
        report["size"] = _sizes(net, stage / "ticket.slt", slt_ticket.fp32_bits(template))
    else:
        report["size"] = {"fp32_bits": slt_ticket.fp32_bits(template),
                          "params": sum(p.numel() for p in deployed.parameters())}
    report.update(_export_and_time(deployed, net, train_weights, stage, inputs, shape, **export))
    report["seconds"] = round(time.perf_counter() - start, 2)


def _check_fit(template: nn.Module, arch: str, train: ImageDataset, test: ImageDataset) -> int:
    """The architecture's number of outputs; the data must fit it (one-line error otherwise)."""
    with torch.no_grad():
        try:
            classes = int(template.eval()(torch.zeros((2, *train.image_shape))).shape[1])
        except Exception as exc:  # noqa: BLE001 - any forward failure: the data does not fit the architecture
            raise InputError(f"--arch {arch} does not accept {train.image_shape} images: "
                             f"{str(exc).splitlines()[0]}") from None
    for ds, flag in ((train, "--data"), (test, "--eval-data")):
        check_dataset(ds, input_shape=train.image_shape, num_classes=classes, name=flag)
    return classes


def _publish(out_dir: Path, report: dict[str, Any], fill: Any) -> dict[str, Path]:
    """Stage every output in a temporary folder beside ``out_dir`` (``fill(stage)`` writes the artefacts and
    completes ``report``), then move them in; a failure leaves nothing behind."""
    with staging(out_dir, prefix=".slt-") as stage:
        fill(stage)
        (stage / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (stage / "report.md").write_text(render_markdown(report))
        return publish(stage, out_dir, OUTPUT_FILES)


def _reinitialised(template: nn.Module, seed: int) -> nn.Module:
    from .models import reinitialise

    return reinitialise(template, seed=seed).train()


def _report_head(arch: str, cfg: slt_mod.SLTConfig, train_weights: bool, command: list[str] | None,
                 evaluated_on: str, n_train: int, accuracy: float, classes: int, trained: Any, trainable: int,
                 bn_images: int, train_cfg: TrainConfig, augment: bool, normalize: str, device: str) -> dict[str, Any]:
    from .report import versions

    history = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()} for rec in trained.history]
    return {
        "kind": "weight-trained" if train_weights else _kind(cfg),
        "arch": arch,
        "config": None if train_weights else cfg.to_dict(),
        "accuracy": accuracy, "chance": 1.0 / classes, "evaluated_on": evaluated_on,
        "training": {"images": n_train, "epochs": trained.epochs, "seconds": round(trained.seconds, 2),
                     "trainable": trainable, "what": "weights" if train_weights else "scores (weights never train)",
                     "lr": train_cfg.lr, "optimizer": train_cfg.optimizer, "weight_decay": train_cfg.weight_decay,
                     "budget_seconds": train_cfg.budget_seconds, "augment": augment, "normalize": str(normalize),
                     "bn_recalib_images": bn_images, "device": device, "history": history},
        "command": command if command is not None else sys.argv[1:],
        "versions": versions(),
    }


def _kind(cfg: slt_mod.SLTConfig) -> str:
    if cfg.freeze == 0:
        return "slt-dense-source"
    if cfg.freeze_prune == 1:
        return "slt-pruned-source"
    return "slt-frozen"


def _store_and_reload(net: nn.Module, deployed: nn.Module, stage: Path, arch: str, num_classes: int,
                      shape: tuple[int, ...], inputs: list[torch.Tensor], template: nn.Module) -> dict[str, Any]:
    """Write ``ticket.slt``, rebuild the network from it and require bit-identical outputs."""
    path = slt_ticket.save_ticket(net, stage / "ticket.slt", arch=arch, num_classes=num_classes, input_shape=shape)
    base = None if ":" not in arch and arch in _builtin() else template
    rebuilt = slt_ticket.load_slt(path, base=base)
    worst = 0.0
    identical = True
    with torch.no_grad():
        for x in inputs:
            a, b = deployed(x), rebuilt(x)
            identical = identical and torch.equal(a, b)
            worst = max(worst, float((a - b).abs().max()))
    if not identical:
        raise ValidationError(f"the network rebuilt from ticket.slt differs from the searched one (max abs diff "
                              f"{worst:.3g}); nothing was written. Re-run with --debug and report it")
    return {"bit_identical": True, "max_abs_diff": worst, "images": sum(len(x) for x in inputs),
            "rebuilt_from": "arch name" if base is None else "the given architecture instance"}


def _builtin() -> list[str]:
    from .models import list_archs

    return list_archs()


def _sizes(net: nn.Module, ticket: Path, fp32_bits: int) -> dict[str, Any]:
    bits = slt_ticket.size_bits(net)
    dense_slt = bits["dense_source_mask_bits"] + slt_ticket.SEED_BITS + bits["bn_bits"]
    return {**bits, "ticket_file_bytes": ticket.stat().st_size,
            "dense_source_slt_bits": dense_slt, "fp32_weight_trained_bits": fp32_bits,
            "mask_reduction_vs_dense_source": round(bits["dense_source_mask_bits"] / max(bits["mask_bits"], 1), 4),
            "total_reduction_vs_dense_source": round(dense_slt / bits["total_bits"], 4),
            "total_reduction_vs_fp32": round(fp32_bits / bits["total_bits"], 4),
            "stored_floats": "BatchNorm running_mean and running_var (float32); nothing else: weights and the frozen "
                             "pattern come from the seeds, layers have no bias, BatchNorm has no affine parameters"}


def _export_and_time(deployed: nn.Module, net: nn.Module, train_weights: bool, stage: Path,
                     inputs: list[torch.Tensor], shape: tuple[int, ...], *, atol: float, threads: int | None,
                     batches: tuple[int, ...], repeats: int, seed: int) -> dict[str, Any]:
    """ONNX of the deployed network with parity (:func:`compressor.deploy.export_verify`); for a ticket also the
    unmasked source network (same graph, random dense weights) so the latency of the zeros is measured, not assumed."""
    from exporters import benchmark_latency

    from .deploy import check_runtime, export_verify

    check_runtime()
    models = {"compressed": deployed}
    if not train_weights:
        models["original"] = _unmasked(net)
    folder = stage / "onnx"
    folder.mkdir()
    example = torch.zeros((2, *shape))
    exported = export_verify(models, example, inputs, folder=folder, atol=atol, threads=threads)
    sizes, deflated = exported.onnx_bytes(), exported.deflated_bytes()
    section: dict[str, Any] = {
        "onnx": {"bytes": sizes["compressed"], "deflated_bytes": deflated["compressed"],
                 "source_bytes": sizes.get("original"), "source_deflated_bytes": deflated.get("original"),
                 "parity": exported.parity, "seconds": exported.seconds}}
    if batches:
        names = {"model": exported.paths["compressed"]}
        if "original" in exported.paths:
            names["unmasked source"] = exported.paths["original"]
        bench = benchmark_latency({k: str(v) for k, v in names.items()}, input_shape=shape, batch_sizes=batches,
                                  threads=ThreadPolicy(threads).onnxruntime(), repeats=repeats, seed=seed)
        section["latency"] = bench.to_dict()
    if not train_weights:
        section["dense_runtime"] = DENSE_RUNTIME_NOTE
    os.replace(exported.paths["compressed"], stage / "model.onnx")
    return section


@torch.no_grad()
def _unmasked(net: nn.Module) -> nn.Module:
    """The ticket's source network without its mask (every random weight in): the same dense graph."""
    dense = slt_mod.materialize(net)
    searched = dict(slt_mod.slt_layers(net))
    for name, module in dense.named_modules():
        if name in searched:
            module.weight.copy_(searched[name].weight.cpu())  # type: ignore[operator]
    return dense


# ------------------------------------------------------------------------------------------------ markdown
def _bits(n: Any) -> str:
    return f"{int(n):,} bits ({int(n) / 8 / 1024:,.1f} KiB)"


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"# compress slt: {report['kind']} ({report['arch']})", ""]
    t = report["training"]
    if report["config"] is not None:
        c = report["config"]
        split = "1 - keep per layer" if c["freeze_prune"] is None else f"{c['freeze_prune']:g}"
        lines += [f"Strong lottery ticket found by edge-popup in a seeded random {report['arch']} "
                  f"(init {c['init']}, scale_fan {c['scale_fan']}, {c['distribution']} layer ratios): keep "
                  f"{c['keep']:g} of the weights, {c['freeze']:g} frozen before the search (pruned share {split}), "
                  f"weights never trained; {t['epochs']} epochs of score search on {t['images']} images "
                  f"({t['seconds']:.0f} s, {t['trainable']:,} scores trained).", ""]
    else:
        lines += [f"Baseline: the weights of {report['arch']} trained for {t['epochs']} epochs on {t['images']} images "
                  f"({t['seconds']:.0f} s).", ""]
    lines += ["| measure | value |", "| --- | --- |",
              f"| top-1 on {report['evaluated_on']} | {100 * report['accuracy']:.2f} % (chance "
              f"{100 * report['chance']:.0f} %) |"]
    s = report["size"]
    if "mask_bits" in s:
        lines += [f"| stored mask bits (searched weights only) | {s['mask_bits']:,} |",
                  f"| stored seeds | {s['seed_bits']} bits |",
                  f"| stored BatchNorm statistics | {s['bn_floats']:,} floats = {s['bn_bits']:,} bits |",
                  f"| ticket, total | {_bits(s['total_bits'])} |",
                  f"| ticket.slt file | {s['ticket_file_bytes']:,} bytes |",
                  f"| same ticket in the dense source (1 bit per weight) | {_bits(s['dense_source_slt_bits'])} |",
                  f"| weight-trained float32 model | {_bits(s['fp32_weight_trained_bits'])} |",
                  f"| mask bits vs dense source | {s['mask_reduction_vs_dense_source']:.2f}x fewer |",
                  f"| total vs weight-trained float32 | {s['total_reduction_vs_fp32']:.1f}x smaller |"]
    else:
        lines += [f"| float32 size | {_bits(s['fp32_bits'])} |"]
    o = report["onnx"]
    lines += [f"| model.onnx | {o['bytes']:,} bytes ({o['deflated_bytes']:,} deflated) |",
              f"| ONNX parity | max abs diff {o['parity']['max_abs_diff']:.3g}, top-1 agreement "
              f"{100 * o['parity']['top1_agreement']:.1f} % |"]
    if "reload" in report:
        lines += [f"| reloaded from ticket.slt | bit-identical on {report['reload']['images']} images |"]
    for batch, row in report.get("latency", {}).get("latency", {}).items():
        cells = ", ".join(f"{name} {stats['p50_ms']:.3f} ms" for name, stats in row.items())
        lines += [f"| onnxruntime p50, batch {batch} | {cells} |"]
    lines.append("")
    if "dense_runtime" in report:
        lines += [report["dense_runtime"], ""]
    if "layers" in report:
        lines += ["| layer | weights | pruned | locked | searched | kept |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['layer']} | {r['weights']:,} | {r['pruned']:,} | {r['locked']:,} | {r['searched']:,} | "
                  f"{r['kept']:,} |" for r in report["layers"]]
        lines.append("")
    lines += ["| epoch | loss | train top-1 | eval top-1 | mask churn |", "| ---: | ---: | ---: | ---: | ---: |"]
    for rec in t["history"]:
        ev = f"{100 * rec['eval_acc']:.2f} %" if rec.get("eval_acc") is not None else "-"
        churn = f"{rec['mask_churn']:.4f}" if "mask_churn" in rec else "-"
        lines.append(f"| {rec['epoch']} | {rec['loss']:.4f} | {100 * rec['train_acc']:.2f} % | {ev} | {churn} |")
    lines.append("")
    return "\n".join(lines)
