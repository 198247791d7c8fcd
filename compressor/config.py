"""``CompressConfig``: every option of a compression run, validated in one place for CLI and API callers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adamw")
METRICS = ("filters", "params", "macs")
QUANTIZE = ("auto", "int8", "none")


@dataclass(frozen=True)
class CompressConfig:
    """Options of :func:`compressor.compress`. ``target`` is the fraction *removed* of ``target_metric``.

    Attributes
    ----------
    method : str
        Registered method name (``l1``, ``random``, ...).
    target : float
        Fraction of ``target_metric`` to remove, in the open interval (0, 1).
    target_metric : {"filters", "params", "macs"} or None
        ``filters`` counts output channels of all Conv2d layers; None means the method's default (``filters`` for
        pruning, ``params`` when a factorisation is involved).
    round_to : int or "auto"
        Keep channel counts at multiples of this where the target allows (1 = no rounding; too coarse for the target,
        some groups get half, a quarter...). ``"auto"`` (default): prune at 1, 2, 4, 8, 16 and 32 (below the widest
        group) and keep the pruned graph measured fastest on the graph the run ships (INT8 when it quantises, else
        fp32), at the first of ``bench_batches`` on the benchmark's threads (:mod:`compressor.widths`); without
        ``bench_batches`` nothing is timed and it is 8. Why the default: onnxruntime's CPU convolutions work in
        channel blocks and the best block differs by graph: on ResNet-56 ``l1`` 0.33 (``benchmarks/round_to_auto.py``)
        16 was fastest in fp32 (batch 1: 2.63x the fp32 original vs 1.15x at 8) and 32 in INT8 (5.22x vs 4.18x at 8;
        INT8 of the original: 4.49x), in every run at batch 1 and 32, 1 and default threads. It costs the candidate
        builds and timing: +70 s (fp32) / +85 s (INT8) for ResNet-56 on 2 busy CPUs, and ``cmi``/``mipp`` score once
        per candidate; pass an integer (e.g. 16 for fp32) to skip it.
    min_keep : float
        Each group keeps at least ``ceil(min_keep * C)`` channels (and at least one).
    ignore_layers : tuple of str
        Layers whose groups are never pruned.
    calib_samples : int
        Images of ``data`` used by data-driven scorers.
    bn_recalib : int
        Images of ``data`` on which the compressed model's BatchNorm statistics are re-estimated before evaluation
        and fine-tuning (0 = off; needs ``data``).
    epochs, lr, optimizer, batch_size, weight_decay, augment
        Fine-tuning; ``augment=None`` enables crop+flip for 32x32 images.
    distill : bool or None
        Fine-tune with logit distillation from the original (the uncompressed input model). ``None`` (default): on,
        except with ``at_init`` (training from scratch, the lottery-ticket setting, stays plain). Measured by
        ``benchmarks/distill_default.py`` (ResNet-56, l1 at a third of the filters, 4 minutes of fine-tuning on one
        core, 3 seeds): +1.8, +2.3, +3.0 points of top-1 over plain cross-entropy at equal wall-clock time.
    device : {"auto", "cpu", "cuda"}
    seed : int
    bench_batches : tuple of int
        Batch sizes for the onnxruntime latency benchmark (empty = no benchmark).
    threads : int or None
        onnxruntime intra-op threads (None = onnxruntime's default).
    bench_repeats : int
        Timed runs per model and batch size.
    atol : float
        Maximum |PyTorch - onnxruntime| accepted by the parity check.
    method_options : dict
        Method-specific options, forwarded to the scorer.
    quantize : {"auto", "int8", "none"}
        INT8 of both graphs after export (onnxruntime ``quantize_static``, calibrated on ``data``): ``auto`` quantises
        when ``data`` is given (calibration needs images), ``int8`` requires it.
    max_accuracy_drop : float
        Largest top-1 loss, in percentage points, that an INT8 graph may have against its fp32 graph; beyond it the
        most sensitive layers stay float, and a graph that still fails stops the run.
    target_latency : float or None
        Instead of ``target``: the latency budget, as a fraction of the original's p50 on the graph the run ships
        (INT8 when it quantises, else fp32), at the first of ``bench_batches``; the smallest fraction of
        ``target_metric`` whose compressed graph, timed beside the original, meets it is searched by measurement
        (:mod:`compressor.latency_target`; ``target`` is not used).
    budget_minutes : float or None
        Instead of ``epochs``: fine-tune for this many wall-clock minutes (evaluation included), the cosine schedule
        fitted to the time, as many epochs as fit (the last one may be partial).
    eval_every_minutes : float or None
        While fine-tuning, also record top-1 on ``eval_data`` each time this many more minutes of training have
        passed (the report's ``finetune.curve``: minutes, epoch, step, top1; the last point is the end of training).
        The time of these evaluations counts neither in the minutes nor against ``budget_minutes``.
    reconstruct : bool
        After pruning, refit each layer whose input channels were removed by least squares on the calibration
        images, so that it reproduces the original layer's output (:mod:`compressor.reconstruct`); needs ``data``.
    dist_timeout : float
        Under torchrun: seconds a process waits for the others in one collective (the process group's timeout)
        before the run fails; rank 0 scores, compresses and exports alone while the others wait, so it must cover
        those stages.
    at_init : bool
        Score and prune a re-initialised copy of the model (random weights, seeded by ``seed``), then train the
        pruned network from scratch for ``epochs``; the trained input stays the "original" it is compared with.
    """

    method: str = "l1"
    target: float = 0.33
    target_metric: str | None = None
    round_to: int | str = "auto"
    min_keep: float = 0.1
    ignore_layers: tuple[str, ...] = ()
    calib_samples: int = 256
    bn_recalib: int = 1024
    epochs: int = 0
    lr: float = 0.01
    optimizer: str = "sgd"
    batch_size: int = 128
    weight_decay: float = 5e-4
    distill: bool | None = None
    augment: bool | None = None
    device: str = "auto"
    seed: int = 0
    bench_batches: tuple[int, ...] = (1, 32)
    threads: int | None = None
    bench_repeats: int = 50
    atol: float = 1e-4
    method_options: dict[str, Any] = field(default_factory=dict)
    at_init: bool = False
    quantize: str = "auto"
    max_accuracy_drop: float = 1.0
    target_latency: float | None = None
    reconstruct: bool = True
    budget_minutes: float | None = None
    eval_every_minutes: float | None = None
    dist_timeout: float = 1800.0

    def validate(self) -> CompressConfig:
        """Raise :class:`InputError` naming the first invalid option; return ``self``."""
        checks = [
            (isinstance(self.target, (int, float)) and 0.0 < self.target < 1.0 and math.isfinite(self.target),
             f"--target must be a fraction in the open interval (0, 1), e.g. 0.33; got {self.target}"),
            (self.target_metric is None or self.target_metric in METRICS,
             f"--target-metric must be one of {', '.join(METRICS)}; got {self.target_metric!r}"),
            (self.round_to == "auto" or (type(self.round_to) is int and self.round_to >= 1),
             f"--round-to must be an integer >= 1 or auto (widths chosen by measured latency); got {self.round_to!r}"),
            (0.0 < self.min_keep < 1.0, f"--min-keep must be in (0, 1); got {self.min_keep}"),
            (self.calib_samples >= 1, f"--calib-samples must be >= 1; got {self.calib_samples}"),
            (self.bn_recalib >= 0, f"--bn-recalib must be >= 0 (0 = off); got {self.bn_recalib}"),
            (self.epochs >= 0, f"--epochs must be >= 0; got {self.epochs}"),
            (self.lr > 0, f"--lr must be > 0; got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1; got {self.batch_size}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}"),
            (all(b >= 1 for b in self.bench_batches), f"--bench-batch sizes must be >= 1; got {self.bench_batches}"),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1; got {self.threads}"),
            (self.bench_repeats >= 1, f"--bench-repeats must be >= 1; got {self.bench_repeats}"),
            (self.atol > 0, f"--atol must be > 0; got {self.atol}"),
            (self.quantize in QUANTIZE, f"--quantize must be one of {', '.join(QUANTIZE)}; got {self.quantize!r}"),
            (0.0 <= self.max_accuracy_drop <= 100.0,
             f"--max-accuracy-drop is in percentage points, in [0, 100], e.g. 1; got {self.max_accuracy_drop}"),
            (self.target_latency is None or (isinstance(self.target_latency, (int, float))
                                             and 0.0 < self.target_latency < 1.0),
             "--target-latency is a fraction of the original's latency in (0, 1), e.g. 0.5; "
             f"got {self.target_latency}"),
            (self.target_latency is None or bool(self.bench_batches),
             "--target-latency times the compressed graphs; it needs a --bench-batch (not none)"),
            (self.budget_minutes is None or (isinstance(self.budget_minutes, (int, float))
                                             and math.isfinite(self.budget_minutes) and self.budget_minutes > 0),
             f"--budget-minutes must be a positive number of minutes, e.g. 60; got {self.budget_minutes}"),
            (self.eval_every_minutes is None or (isinstance(self.eval_every_minutes, (int, float))
                                                 and math.isfinite(self.eval_every_minutes)
                                                 and self.eval_every_minutes > 0),
             f"--eval-every-minutes must be a positive number of minutes, e.g. 5; got {self.eval_every_minutes}"),
            (self.eval_every_minutes is None or self.trains,
             "--eval-every-minutes records top-1 while fine-tuning: add --budget-minutes M or --epochs N"),
            (isinstance(self.dist_timeout, (int, float)) and math.isfinite(self.dist_timeout) and self.dist_timeout > 0,
             f"--dist-timeout must be a positive number of seconds, e.g. 1800; got {self.dist_timeout}"),
            (self.budget_minutes is None or self.epochs == 0,
             "give --epochs or --budget-minutes, not both"),
            (not self.at_init or self.epochs > 0 or self.budget_minutes is not None,
             "--at-init prunes a randomly initialised network, which must then be trained: add --epochs N"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        return self

    @property
    def distills(self) -> bool:
        """Whether fine-tuning distils from the original: ``distill``, or by default on unless ``at_init``."""
        return (not self.at_init) if self.distill is None else self.distill

    @property
    def trains(self) -> bool:
        """Whether the fine-tuning stage runs (``epochs`` or a time budget)."""
        return self.epochs > 0 or self.budget_minutes is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
