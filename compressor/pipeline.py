"""The stages of a compression run, as public functions that each return a typed result.

``load -> prepare -> compress -> recalibrate -> train -> export_verify -> benchmark -> (write)``;
:func:`compressor.api.compress` chains them, and other entry points (``compress inspect``, the benchmark harness, a
notebook) can call any of them alone. Each result carries the report section it contributes (``section()``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from . import latency_target, models, widths
from .config import CompressConfig
from .distributed import Dist, DistributedTraining, collective, scaled_lr
from .errors import DataError, InputError
from .io import LoadedModel, load_model
from .methods.base import Budget, Method, MethodContext
from .metrics import count_filters, count_macs, count_params
from .pruning import engine
from .threads import ThreadPolicy
from .evaluation import evaluate, recalibrate_bn
from .training import Callback, TrainConfig, Trainer, TrainState


class Stopwatch:
    """Seconds per stage, summed over repeated entries."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when PyTorch sees one, else CPU; ``cuda`` without CUDA is a one-line error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to PyTorch; use --device auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sizes(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """``params``, ``macs`` (one image) and ``filters`` of ``model``."""
    return {"params": count_params(model), "macs": count_macs(model, example), "filters": count_filters(model)}


# ------------------------------------------------------------------------------------------------------ load
def load(model: Any, *, arch: str | None = None, trust_pickle: bool = False, arch_kwargs: Any = None) -> LoadedModel:
    """Stage 1: a checkpoint path (see :func:`compressor.io.load_model`), an ONNX file or an ``nn.Module``, in eval
    mode."""
    if isinstance(model, nn.Module):
        return LoadedModel(model.eval(), arch or type(model).__name__, None, "<in-memory module>")
    return load_model(model, arch=arch, trust_pickle=trust_pickle, arch_kwargs=arch_kwargs)


# --------------------------------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    """Stage 2: the datasets, loaders and facts every later stage needs."""

    example: torch.Tensor
    num_classes: int
    normalization: Any
    train: Any = None
    test: Any = None
    calib: Any = None  # calibration loader (no augmentation)
    eval: Any = None  # evaluation loader

    def loader(self, cfg: CompressConfig, *, train: bool, dist: Dist | None = None) -> Any:
        """The fine-tuning loader (augmented for 32x32 images unless ``cfg.augment`` says otherwise); with ``dist``,
        this process's share (:meth:`compressor.distributed.Dist.shard`)."""
        ds = self.train if train else self.test
        augment = cfg.augment if cfg.augment is not None else tuple(ds.image_shape[1:]) == (32, 32)
        if dist is not None:
            return dist.shard(ds, batch_size=cfg.batch_size, normalize=self.normalization, train=train,
                              augment=augment and train, seed=cfg.seed)
        return data_mod.make_loader(ds, batch_size=cfg.batch_size, normalize=self.normalization, shuffle=train,
                                    augment=augment and train, seed=cfg.seed, drop_last=False)

    def subset_loader(self, n: int, *, seed: int, batch_size: int, dist: Dist | None = None) -> Any:
        """``n`` class-balanced training images, no augmentation (calibration, BN statistics); with ``dist``, this
        process's share of them."""
        ds = data_mod.calibration_subset(self.train, n, seed=seed)
        if dist is not None:
            return dist.shard(ds, batch_size=batch_size, normalize=self.normalization, train=False, augment=False,
                              seed=seed)
        return data_mod.make_loader(ds, batch_size=batch_size, normalize=self.normalization, shuffle=False,
                                    augment=False, seed=seed, drop_last=False)

    def quantizes(self, cfg: CompressConfig) -> bool:
        """Whether the INT8 stage runs: ``int8``, or ``auto`` with training data to calibrate on."""
        return cfg.quantize == "int8" or (cfg.quantize == "auto" and self.train is not None)

    def numpy_batches(self) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]] | None]:
        """Calibration images and labelled evaluation batches as numpy arrays (for onnxruntime)."""
        calib = [x.numpy() for x, _ in self.calib]
        evals = [(x.numpy(), y.numpy()) for x, y in self.eval] if self.eval is not None else None
        return calib, evals

    def parity_inputs(self, n: int = 256) -> list[torch.Tensor]:
        """Real images for the parity check: eval data first, else training data, else seeded noise."""
        source = self.test if self.test is not None else self.train
        if source is None:
            return [torch.randn((32, *self.example.shape[1:]), generator=torch.Generator().manual_seed(0))]
        subset = source.subset(list(range(min(n, len(source)))))
        return [x for x, _ in data_mod.make_loader(subset, batch_size=64, normalize=self.normalization)]


def _dataset(spec: Any) -> data_mod.ImageDataset | None:
    if spec is None:
        return None
    return spec if isinstance(spec, data_mod.ImageDataset) else data_mod.load_dataset(str(spec))


def _output_classes(model: nn.Module, example: torch.Tensor) -> int:
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as exc:  # noqa: BLE001 - any forward failure means the model cannot take this input
        raise DataError(f"the model does not accept inputs of shape {tuple(example.shape[1:])}: "
                        f"{str(exc).splitlines()[0]}") from None
    if out.ndim != 2:
        raise InputError(f"the model's output has shape {tuple(out.shape)}; compressor expects (batch, classes) logits")
    return int(out.shape[1])


def prepare(loaded: LoadedModel, data: Any, eval_data: Any, *, normalize: str, cfg: CompressConfig,
            method: Method) -> Prepared:
    """Stage 2: load the data, fix the input shape, check data, model and method fit each other before any work."""
    train, test = _dataset(data), _dataset(eval_data)
    shape = loaded.input_shape or next((ds.image_shape for ds in (train, test) if ds is not None), None)
    if shape is None:
        raise InputError(f"cannot tell the input shape of {loaded.arch}; pass --data so it can be read from images")
    example = torch.zeros((1, *shape))
    num_classes = _output_classes(loaded.model, example)
    for ds, flag in ((train, "--data"), (test, "--eval-data")):
        if ds is not None:
            data_mod.check_dataset(ds, input_shape=tuple(shape), num_classes=num_classes, name=flag)
    if method.requires_data and train is None:
        raise InputError(f"--method {cfg.method} needs calibration data; pass --data")
    if cfg.quantize == "int8" and train is None:
        raise InputError("--quantize int8 calibrates on images of --data; pass --data (or use --quantize none)")
    if cfg.trains and train is None:
        flag = f"--epochs {cfg.epochs}" if cfg.epochs else f"--budget-minutes {cfg.budget_minutes:g}"
        raise InputError(f"{flag} needs training data; pass --data (or do not fine-tune)")
    if method.needs_epochs() and not cfg.trains:
        raise InputError(f"--method {cfg.method} with these options trains while compressing; pass --epochs 1 or more")
    prepared = Prepared(example, num_classes, data_mod.parse_normalize(normalize), train, test)
    if train is not None:
        prepared.calib = prepared.subset_loader(cfg.calib_samples, seed=cfg.seed, batch_size=cfg.batch_size)
    if test is not None:
        prepared.eval = prepared.loader(cfg, train=False)
    if "onnx_input" in loaded.details:  # an ONNX file as input: the conversion checked against it in onnxruntime
        from .onnx_input import verify_input

        loaded.details["onnx_input"] = verify_input(loaded, prepared.parity_inputs(), atol=cfg.atol)
    return prepared


# -------------------------------------------------------------------------------------------------- compress
@dataclass
class Compressed:
    """Stage 3: the compressed model, its replay records, the method's report section and training callbacks."""

    model: nn.Module
    method: Method
    records: list[dict[str, Any]]
    report: dict[str, Any]
    callbacks: list[Any] = field(default_factory=list)
    target: float | None = None  # the fraction applied (``--target``, or the one ``--target-latency`` found)
    channels: dict[str, dict[str, list[int]]] | None = None  # original channels each layer kept (pruning only)

    @property
    def stages(self) -> list[str]:
        return [str(r["kind"]) for r in self.records]


def method_context(original: nn.Module, prepared: Prepared, cfg: CompressConfig, method: Method,
                   device: torch.device) -> MethodContext:
    """What a method may read (:class:`~compressor.methods.base.MethodContext`), from the run's options."""
    budget = Budget(cfg.target, cfg.target_metric or method.default_metric, cfg.round_to, cfg.min_keep,
                    tuple(cfg.ignore_layers))
    train = prepared.loader(cfg, train=True) if prepared.train is not None else None
    latency = latency_measure(prepared, cfg) if cfg.round_to == widths.AUTO and cfg.bench_batches else None
    settings = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                           seed=cfg.seed)

    def loader_for(spec: str, flag: str) -> Any:
        ds = data_mod.load_dataset(spec)
        data_mod.check_dataset(ds, input_shape=tuple(prepared.example.shape[1:]), num_classes=prepared.num_classes,
                               name=flag)
        return replace(prepared, train=ds).loader(cfg, train=True)

    return MethodContext(example=prepared.example, num_classes=prepared.num_classes, device=device, seed=cfg.seed,
                         budget=budget, original=original, calib=prepared.calib, train=train, epochs=cfg.epochs,
                         threads=cfg.threads, latency=latency, train_config=settings, loader_for=loader_for)


def latency_measure(prepared: Prepared, cfg: CompressConfig) -> widths.OnnxLatency:
    """How ``--round-to auto`` times the candidate widths: on the graph the run ships (INT8 when the INT8 stage runs,
    else fp32), at the first ``--bench-batch``, on the benchmark's onnxruntime threads. A run without
    ``--bench-batch`` times nothing (:func:`method_context` passes no measure: ``auto`` is then 8)."""
    calib = [x.numpy() for x, _ in prepared.calib] if prepared.quantizes(cfg) else None
    batch = cfg.bench_batches[0] if cfg.bench_batches else 1
    return widths.OnnxLatency(prepared.example, batch=batch, threads=ThreadPolicy(cfg.threads).onnxruntime(),
                              calib=calib, repeats=cfg.bench_repeats, seed=cfg.seed)


def compress_model(original: nn.Module, method: Method, prepared: Prepared, cfg: CompressConfig,
                   device: torch.device) -> Compressed:
    """Stage 3: apply ``method`` to ``original`` (or, with ``cfg.at_init``, to a seeded re-initialisation of it)."""
    source = models.reinitialise(original, seed=cfg.seed) if cfg.at_init else original
    ctx = method_context(original, prepared, cfg, method, device)
    method.check(ctx)
    if cfg.target_latency is not None:
        return _meet_latency(source, original, method, ctx, prepared, cfg)
    with ThreadPolicy(cfg.threads).apply("score"):
        result = method.apply(source, ctx)
    return Compressed(result.model.eval(), method, result.records, result.report, result.callbacks, cfg.target,
                      result.channels)


def _meet_latency(source: nn.Module, original: nn.Module, method: Method, ctx: MethodContext, prepared: Prepared,
                  cfg: CompressConfig) -> Compressed:
    """Stage 3 with ``--target-latency``: the smallest fraction of the metric whose compressed graph runs within
    the budget (:func:`compressor.latency_target.search_target`); with ``--round-to auto`` the first probe picks the
    alignment and the others keep it."""
    timer = replace(latency_measure(prepared, cfg), reference=original)  # the original is exported once
    state: dict[str, Any] = {"ctx": ctx}

    def build(t: float) -> latency_target.Built:
        probe_ctx = replace(state["ctx"], budget=state["ctx"].budget.scaled(t))
        with ThreadPolicy(cfg.threads).apply("score"):
            result = method.apply(source, probe_ctx)
        chosen = result.report.get("alignment", {}).get("chosen")
        if ctx.budget.round_to == widths.AUTO and chosen is not None and "round_to" not in state:
            state["round_to"] = chosen
            state["ctx"] = replace(ctx, budget=replace(ctx.budget, round_to=int(chosen)), latency=None)
        done = achieved(original, result.model, prepared.example, ctx.budget.metric)
        return latency_target.Built(result.model, done, count_macs(result.model, prepared.example), result=result)

    choice = latency_target.search_target(build, timer, original, float(cfg.target_latency or 0.0))
    result = choice.built.result
    report = dict(result.report)
    report["latency_target"] = choice.section(**timer.describe(), round_to=state.get("round_to", cfg.round_to))
    return Compressed(result.model.eval(), method, result.records, report, result.callbacks, choice.chosen.target,
                      result.channels)


# ----------------------------------------------------------------------------------------------- reconstruct
def reconstruct(compressed: Compressed, original: nn.Module, prepared: Prepared, cfg: CompressConfig) -> dict[str, Any]:
    """Stage 3b: refit, in place, the layers whose input channels were removed, by least squares on the calibration
    images (:func:`compressor.reconstruct.reconstruct`); returns the report's ``reconstruction`` section, which
    says why when the stage is skipped."""
    from .reconstruct import reconstruct as refit

    reason = ("--no-reconstruct" if not cfg.reconstruct else "--at-init" if cfg.at_init
              else "no --data to calibrate on" if prepared.calib is None
              else "the method gave no channel map (no channels removed, or retrained after removing them)"
              if not compressed.channels else None)
    if reason is not None:
        return {"skipped": reason}
    batches = [x for x, _ in prepared.calib]
    with ThreadPolicy(cfg.threads).apply("evaluate"):
        return refit(original.cpu().eval(), compressed.model.cpu(), compressed.channels or {}, batches,
                     seed=cfg.seed)


# ----------------------------------------------------------------------------------------------- recalibrate
@dataclass(frozen=True)
class Recalibrated:
    """Stage 4: top-1 straight after compression, the BN-recalibrated top-1 and the images used."""

    accuracy_stale: float | None
    accuracy: float | None
    images: int | None


def recalibrate(model: nn.Module, prepared: Prepared, cfg: CompressConfig, device: torch.device, *,
                reconstructed: bool = False, dist: Dist | None = None) -> Recalibrated:
    """Stage 4: re-estimate the compressed model's BatchNorm statistics on ``cfg.bn_recalib`` training images
    (EagleEye's adaptive BN; skipped without data or with ``bn_recalib=0``), evaluating before and after.

    Skipped too when ``reconstructed``: the refit layers reproduce the original pre-BN outputs, for which the
    original statistics are the right ones. Measured (``python -m benchmarks.reconstruct``, ResNet-56, 0.33 of the
    filters, test1000): after reconstruction, recalibrating lowered top-1 from 70.2% to 65.3% (``l1``, 256
    calibration images) and from 75.0% to 69.2% (1024).

    With ``dist`` each process recalibrates on its share of the images and the statistics are pooled
    (:meth:`compressor.distributed.Dist.pool_bn`); evaluations count every process's share."""
    stale, images = None, None
    evals = prepared.eval if dist is None or prepared.eval is None else prepared.loader(cfg, train=False, dist=dist)
    reduce = None if dist is None else dist.sum
    with ThreadPolicy(cfg.threads).apply("evaluate"):
        if prepared.train is not None and cfg.bn_recalib > 0 and not reconstructed:
            if evals is not None:
                stale = evaluate(model, evals, device=device, reduce=reduce)
            loader = prepared.subset_loader(cfg.bn_recalib, seed=cfg.seed + 1, batch_size=cfg.batch_size, dist=dist)
            images = recalibrate_bn(model, loader, device=device)
            images = images if dist is None else dist.pool_bn(model, images)
        accuracy = evaluate(model, evals, device=device, reduce=reduce) if evals is not None else None
    return Recalibrated(stale, accuracy, images)


def top1(model: nn.Module, prepared: Prepared, cfg: CompressConfig, device: torch.device, *,
         dist: Dist | None = None) -> float | None:
    """Top-1 of ``model`` on the evaluation data (None without it), under the thread policy's ``evaluate`` count;
    with ``dist``, each process evaluates its share and the counts are summed."""
    if prepared.eval is None:
        return None
    with ThreadPolicy(cfg.threads).apply("evaluate"):
        if dist is not None:
            return evaluate(model, prepared.loader(cfg, train=False, dist=dist), device=device, reduce=dist.sum)
        return evaluate(model, prepared.eval, device=device)


# ----------------------------------------------------------------------------------------------------- train
#: With ``--budget-minutes`` the time ends training; this only caps the epochs (and sizes per-step schedules).
MAX_BUDGET_EPOCHS = 10_000


@dataclass
class Trained:
    """Stage 5: the fine-tuned model, the training result, and the records/report a training callback changed."""

    model: nn.Module
    result: Any
    records: list[dict[str, Any]]
    report: dict[str, Any]


def train(compressed: Compressed, original: nn.Module, prepared: Prepared, cfg: CompressConfig,
          device: torch.device, *, dist: Dist | None = None) -> Trained:
    """Stage 5: fine-tune with the one :class:`~compressor.training.Trainer` (the method's callbacks included);
    a callback that changes the structure (tucker's adaptive ranks) hands back the records and report to keep.

    With ``dist``: DistributedDataParallel over this process's share of the data, the learning rate scaled to the
    global batch (:func:`compressor.distributed.scaled_lr`), statistics and evaluations summed over the processes."""
    budget = None if cfg.budget_minutes is None else 60.0 * cfg.budget_minutes
    config = TrainConfig(epochs=cfg.epochs if budget is None else MAX_BUDGET_EPOCHS,
                         lr=cfg.lr if dist is None else scaled_lr(cfg.lr, dist.world_size),
                         optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, seed=cfg.seed, budget_seconds=budget,
                         eval_every_seconds=None if cfg.eval_every_minutes is None else 60.0 * cfg.eval_every_minutes)
    policy = ThreadPolicy(cfg.threads)
    ddp = [] if dist is None else [DistributedTraining(dist)]
    trainer = Trainer(config, device=device, callbacks=[*compressed.callbacks, *ddp, RefreshThreads(policy)],
                      is_main=dist is None or dist.is_main, reduce=None if dist is None else dist.sum)
    evals = prepared.eval if dist is None or prepared.eval is None else prepared.loader(cfg, train=False, dist=dist)
    with policy.apply("train"), contextlib.nullcontext() if dist is None else collective("fine-tuning"):
        result = trainer.fit(compressed.model, prepared.loader(cfg, train=True, dist=dist),
                             teacher=original if cfg.distills else None, eval_loader=evals)
    records, report = list(compressed.records), dict(compressed.report)
    for callback in compressed.callbacks:
        records = _replace_records(records, callback.records())
        _merge(report, callback.report())
    return Trained(result.model.eval(), result, records, report)


class RefreshThreads(Callback):
    """Re-decides the training threads after every epoch (:meth:`ThreadPolicy.refresh`): a neighbour that started
    or stopped mid-run is seen at the next epoch; nothing changes under ``--threads N``."""

    def __init__(self, policy: ThreadPolicy) -> None:
        self.policy = policy

    def on_epoch_end(self, state: TrainState) -> None:
        self.policy.refresh("train")


def _replace_records(records: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each new record replaces the old record of the same kind."""
    kinds = {str(r["kind"]): r for r in new}
    return [kinds.get(str(r["kind"]), r) for r in records]


def _merge(report: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(report.get(key), dict):
            report[key].update(value)
        else:
            report[key] = value


def achieved(original: nn.Module, model: nn.Module, example: torch.Tensor, metric: str) -> float:
    """Fraction of ``metric`` removed from ``original`` in ``model``."""
    return 1.0 - engine.measure(model, example, metric) / engine.measure(original, example, metric)
