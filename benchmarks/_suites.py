"""The benchmark suites of ``python -m benchmarks.run``: which models, methods and targets, and with what budget.

A suite is a grid of configurations (model x method x target) and one :class:`Budget` that every configuration of
the suite shares, so methods are compared at the same fine-tuning cost (same seed, epochs, learning rate and training
subset) and the same benchmark settings.

``target`` is the fraction *removed* of ``metric``; a metric of None means the method's default (``filters`` for
channel pruning, ``params`` when a factorisation is involved; ``cmi+tucker`` gives half the target to pruning and
half to the factorisation). The grid uses the default metric at 0.33 and 0.5, and MACs at 0.5.

Suites:

* ``smoke``: ResNet-20, three methods at 0.5 and ``l1`` at a MAC target; 1 epoch on 1,000 images, top-1 on 500 test
  images, 128 calibration images. It checks the harness, not the methods.
* ``cpu``: ResNet-20 and ResNet-56, every method (and ``tucker-adaptive``, see :data:`VARIANTS`), the full grid;
  1 epoch on 10,000 images (class-balanced). Runs target by target (0.33 of each method's default metric first), so
  an interrupted run (``--resume`` continues it) has compared every method at one budget before it starts the next.
* ``cpu-long``: the comparison that matters most at a larger CPU budget: ResNet-56 at 0.33 with ``random``, ``l1``,
  ``cmi``, ``mipp`` and ``tucker``, 3 epochs on 20,000 images (6x the ``cpu`` budget).
* ``gpu``: the same grid with a real budget: 30 epochs on all 50,000 images, CUDA (AMP) for fine-tuning.
* ``sample``: the bundled sample (``samples/``), two methods; seconds, needs no ``../shared``.
* ``deploy`` (issue 12): what ships. ResNet-56 (``../shared``, real top-1) with ``l1``, ``cmi``, ``mipp`` at a third of
  the filters and ``tucker`` at a third of the params, each pruning method at ``--round-to`` 8, 16 and ``auto`` (when
  this checkout's :class:`compressor.config.CompressConfig` accepts it; tucker's ranks are not aligned, so it runs
  once), ``blocks`` (depth pruning; no alignment; also at half the filters) and ``blocks+l1`` (``--round-to 16``);
  and torchvision's
  ResNet-18, ResNet-50 and MobileNetV2 at 224x224 (model code only, random weights, 1000 classes:
  latency only, see :mod:`benchmarks.torchvision_models`) with ``l1`` at 0.33. Every row quantises both graphs to
  INT8 and times all four (fp32/INT8 x original/compressed) interleaved on one thread (every stage runs on one
  thread: the machine's two cores are shared). ResNet-56 gets the ``cpu`` suite's small budget (1 epoch on 10,000
  images, after BatchNorm recalibration), so its top-1 is that of a model one would ship rather than the 20-30% of
  an unrecovered one (issue 12's table used ``--epochs 0``; fine-tuning changes the weights, not the graph that is
  timed). The random-weight models get no fine-tuning (``epochs`` 0, see :data:`LATENCY_ONLY`).
* ``cpu-hour-screen`` and ``cpu-hour`` (issue 13, item 6): fine-tuning by the clock (``--budget-minutes``) on all
  50,000 training images with distillation from the original, top-1 recorded along the way
  (``--eval-every-minutes``: each row's ``curve``), fp32 and INT8 top-1 on test1000, every stage on one thread (run
  pinned to one core). The screen: ResNet-20 at half the MACs, every method of :data:`CPU_HOUR_METHODS` (ours,
  ``l1``, ``random`` and torch-pruning's criteria), ``--round-to 8``, 5 minutes each (top-1 every minute). The hour:
  ResNet-56 at half the MACs, the best two of :data:`OURS` and the best two of :data:`TP_PEERS` by fine-tuned fp32
  top-1 in the stored screen results (:func:`select_grid`; refused until the screen has finished), 60 minutes each
  (top-1 every 5 minutes). Both resume across sittings (``--resume``); ``--list`` shows the rows (for the hour,
  with the choice and the screening top-1 behind it). The hour re-reads the screen at every invocation: a screen
  re-run in between that changes the winners changes the hour's grid, and ``--resume`` keeps only the rows of the
  new grid. Fine-tuning minutes are training time: the curve's own evaluations (test1000, a few seconds each) are
  excluded from them and from the budget; the per-epoch evaluations count, as for every ``--budget-minutes`` run.

INT8 (``Budget.quantize``): ``smoke``, ``sample`` and ``deploy`` quantise (``int8``), so their rows carry the INT8
columns. ``cpu``, ``cpu-long`` and ``gpu`` keep their meaning from before the INT8 stage existed: ``none``, the fp32
comparison of the methods (their stored rows stay comparable and resumable, the ``cpu`` suite keeps its one-hour
budget; the GPU suite times on CUDA, where onnxruntime's QDQ graphs are no deployment target).

Durations measured on 2 CPU cores (AMD EPYC) shared with other jobs; wall times there vary by up to 4x with the load,
because two OpenMP threads on two busy cores mostly wait for each other. ``smoke``: 2 min 34 s at load ~1.5,
3 min 51 s at load ~3.5.
``cpu``: on idle cores (load < 1) about 20-40 s per ResNet-20 configuration and 45-110 s per ResNet-56 one; at
load 2-6 a ResNet-56 configuration took 433-443 s (fine-tuning 260-350 s of it).
``gpu``: dominated by 30 epochs x 50,000 images per configuration.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLES = REPO / "samples"
ALL_METHODS = ("random", "l1", "cmi", "mipp", "tucker", "cmi+tucker")
#: Rows that run a method with options, under their own label: ``label -> (method, method_options)``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"tucker-adaptive": ("tucker", {"tucker_adaptive": True})}
FULL_GRID_TARGETS: tuple[tuple[float, str | None], ...] = ((0.33, None), (0.5, None), (0.5, "macs"))


@dataclass(frozen=True)
class DataSpec:
    """Training and evaluation data of a model, relative to the data root (``--shared``) unless absolute."""

    train: str
    eval: str
    normalize: str
    root: str = "shared"  # "shared" (../shared, overridable), "repo" (bundled) or "synthetic" (seeded noise)
    image_size: int = 32  # of the synthetic images (square, 3 channels)


@dataclass(frozen=True)
class ModelSpec:
    """A trained checkpoint and the architecture it loads into (None: inferred from the checkpoint).

    ``checkpoint`` None: no trained weights exist; the configuration's process saves the seeded random
    initialisation of ``arch`` to a temporary file and compresses that (``latency_only``: its top-1 means nothing,
    so the rows say so and the INT8 check is not an accuracy check). ``overrides`` are options of
    :func:`compressor.compress` that replace the suite budget's for this model (e.g. fewer batch sizes at 224x224).
    """

    name: str
    checkpoint: str | None
    arch: str | None
    data: DataSpec
    latency_only: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Budget:
    """What every configuration of a suite shares: fine-tuning, calibration and benchmark settings.

    ``train_images`` None means the whole training set; otherwise a class-balanced subset drawn with ``seed``
    (:func:`compressor.data.calibration_subset`), identical for every configuration of the suite. ``eval_images``
    likewise subsets the evaluation data (None: all of it).
    """

    epochs: int
    train_images: int | None
    eval_images: int | None = None
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    calib_samples: int = 256
    bench_batches: tuple[int, ...] = (1, 32)
    bench_repeats: int = 50
    threads: int | None = None
    quantize: str = "none"  # --quantize of every configuration: "none" (fp32 only), "int8" or "auto"
    budget_minutes: float | None = None  # --budget-minutes instead of epochs (then ``epochs`` is 0)
    eval_every_minutes: float | None = None  # --eval-every-minutes: top-1 along the way (the row's ``curve``)
    distill: bool = False  # --distill: fine-tune with distillation from the original

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bench_batches": list(self.bench_batches)}


@dataclass(frozen=True)
class Config:
    """One configuration of a grid: compress ``model`` with ``method`` to ``target`` of ``metric``.

    ``round_to`` None leaves ``--round-to`` at the tool's default (and out of the key, so older rows still match).
    """

    model: str
    method: str
    target: float
    metric: str | None = None
    round_to: int | str | None = None

    def key(self, metric: str) -> str:
        """Stable identifier of the row, with the metric resolved (e.g. ``resnet20-l1-filters-0.33``, or
        ``resnet56-l1-filters-0.33-r16`` with a ``round_to``)."""
        suffix = "" if self.round_to is None else f"-r{self.round_to}"
        return f"{self.model}-{self.method}-{metric}-{self.target:g}{suffix}"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    budget: Budget
    grid: tuple[Config, ...]
    timeout_s: int = 1800  # a configuration running longer is killed and recorded as failed
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: The suite whose stored results choose this one's grid (:func:`select_grid`); ``grid`` is then empty.
    selected_by: str | None = None

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.grid))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(c.method for c in self.grid))


CIFAR10 = DataSpec(train="data/cifar10/train.npz", eval="data/cifar10/test1000.npz", normalize="imagenet")
SHAPES = DataSpec(train="shapes_train_set.npz", eval="shapes_test_set.npz", normalize="0.5,0.5,0.5/0.5,0.5,0.5",
                  root="repo")
NOISE224 = DataSpec(train="noise", eval="", normalize="imagenet", root="synthetic", image_size=224)
TORCHVISION_MODELS = REPO / "benchmarks" / "torchvision_models.py"
#: Random-weight 224x224 models: no fine-tuning, no BatchNorm recalibration, 64 noise images to calibrate INT8,
#: batch 1 only (a batch of 32 at 224x224 on one busy core costs minutes per graph), and an INT8 check that cannot
#: fail (top-1 agreement of two random-weight graphs is no accuracy).
LATENCY_ONLY = (("epochs", 0), ("bn_recalib", 0), ("calib_samples", 64), ("bench_batches", (1,)),
                ("max_accuracy_drop", 99.0))
MODELS = {
    "resnet20": ModelSpec("resnet20", "models/cifar10-resnet/resnet20-12fca82f.th", "resnet20", CIFAR10),
    "resnet56": ModelSpec("resnet56", "models/cifar10-resnet/resnet56-4bfd9763.th", "resnet56", CIFAR10),
    "samplenet": ModelSpec("samplenet", "samplenet.pt", None, SHAPES),
    "resnet18": ModelSpec("resnet18", None, f"{TORCHVISION_MODELS}:resnet18", NOISE224, latency_only=True,
                          overrides=LATENCY_ONLY, description="torchvision's ResNet-18, 224x224, 1000 classes"),
    "resnet50": ModelSpec("resnet50", None, f"{TORCHVISION_MODELS}:resnet50", NOISE224, latency_only=True,
                          overrides=LATENCY_ONLY, description="torchvision's ResNet-50, 224x224, 1000 classes"),
    "mobilenet_v2": ModelSpec("mobilenet_v2", None, f"{TORCHVISION_MODELS}:mobilenet_v2", NOISE224,
                              latency_only=True, overrides=LATENCY_ONLY,
                              description="torchvision's MobileNetV2, 224x224, 1000 classes"),
}


def grid(models: Iterable[str], methods: Iterable[str],
         targets: Iterable[tuple[float, str | None]]) -> tuple[Config, ...]:
    """Every model x method x (target, metric), in that nesting order."""
    return tuple(Config(m, meth, t, metric) for m, meth, (t, metric) in itertools.product(models, methods, targets))


def deploy_grid() -> tuple[Config, ...]:
    """Issue 12's deployment grid, most wanted rows first (a resumed run fills the rest): ResNet-56 ``l1`` and
    ``mipp`` and ResNet-18 ``l1`` at ``--round-to`` 16 and 8, then MobileNetV2, ``cmi``, ResNet-50, ``tucker``, then
    ``auto``, then depth pruning on ResNet-56 (``blocks``, ``blocks+l1`` at 16, and ``blocks`` at half the filters:
    what the INT8 latency targets need, see ``benchmarks/int8_floor.py``)."""
    def rows(model: str, method: str, aligns: tuple[int | str | None, ...]) -> tuple[Config, ...]:
        return tuple(Config(model, method, 0.33, None, r) for r in aligns)

    order = (("resnet56", "l1"), ("resnet18", "l1"), ("resnet56", "mipp"), ("mobilenet_v2", "l1"), ("resnet56", "cmi"),
             ("resnet50", "l1"))
    fixed = [c for model, method in order for c in rows(model, method, (16, 8))]
    auto = [c for model, method in order for c in rows(model, method, ("auto",))]
    depth = (*rows("resnet56", "blocks", (None,)), *rows("resnet56", "blocks+l1", (16,)),
             Config("resnet56", "blocks", 0.5, None, None))
    return (*fixed, *rows("resnet56", "tucker", (None,)), *auto, *depth)


#: issue 13's ``cpu-hour`` suites: our methods, the baselines and torch-pruning's criteria at half the MACs.
OURS = ("cmi", "mipp", "blocks+l1", "blocks")
TP_PEERS = ("tp-magnitude", "tp-taylor", "tp-hessian", "tp-lamp", "tp-bn", "tp-fpgm")
CPU_HOUR_METHODS = (*OURS, "l1", "random", *TP_PEERS)
HALF_MACS: tuple[float, str] = (0.5, "macs")
CPU_HOUR_ROUND_TO = 8  # every method aligned alike; --round-to auto would time 6 widths per row (x6 cmi/mipp scoring)


def cpu_hour_budget(minutes: float, every: float) -> Budget:
    """The ``cpu-hour`` budgets: ``minutes`` of fine-tuning on all 50,000 training images (distilled from the
    original), top-1 every ``every`` minutes, fp32 and INT8 on test1000, one thread for every stage."""
    return Budget(epochs=0, train_images=None, budget_minutes=minutes, eval_every_minutes=every, distill=True,
                  threads=1, quantize="int8", bench_repeats=50)


class SelectionError(Exception):
    """The stored screening results cannot choose the hour's rows (absent, unfinished, too few successes)."""


def select_grid(screen: dict[str, Any] | None, *, model: str = "resnet56", per_group: int = 2,
                screen_name: str = "cpu-hour-screen") -> tuple[tuple[Config, ...], str]:
    """The hour's grid from the screen's stored results: the best ``per_group`` of :data:`OURS` and of
    :data:`TP_PEERS` by fine-tuned fp32 top-1 (ties: the earlier row), on ``model`` at half the MACs; and a note
    naming them with their screening top-1. :class:`SelectionError` (one line, what to run) when the screen is
    absent, unfinished, or has fewer than ``per_group`` successful rows in a group."""
    how = f"run python -m benchmarks.run --suite {screen_name} --resume first"
    if screen is None:
        raise SelectionError(f"the {screen_name} results are not stored; {how}")
    if not screen.get("meta", {}).get("complete"):
        raise SelectionError(f"the {screen_name} suite has not finished; {how}")
    ok = [r for r in screen.get("rows", []) if r.get("status") == "ok" and r.get("top1_finetuned") is not None]
    chosen: list[str] = []
    for group, label in ((OURS, "ours"), (TP_PEERS, "tp-*")):
        rows = sorted((r for r in ok if r["method"] in group), key=lambda r: -r["top1_finetuned"])[:per_group]
        if len(rows) < per_group:
            raise SelectionError(f"the {screen_name} results have {len(rows)} successful row(s) of {label} "
                                 f"({', '.join(group)}); the hour needs {per_group}: {how}")
        chosen += [r["method"] for r in rows]
    top1 = {r["method"]: r["top1_finetuned"] for r in ok}
    note = (f"methods chosen from the stored {screen_name} results (fp32 top-1 after fine-tuning): best two of ours "
            + ", ".join(f"{m} {100 * top1[m]:.1f}%" for m in chosen[:per_group]) + "; best two tp-* "
            + ", ".join(f"{m} {100 * top1[m]:.1f}%" for m in chosen[per_group:]))
    return tuple(Config(model, m, *HALF_MACS, CPU_HOUR_ROUND_TO) for m in chosen), note


SUITES = {
    "smoke": Suite(
        "smoke", "ResNet-20, three methods, 1 epoch on 1,000 images, top-1 on 500: checks the harness end to end",
        Budget(epochs=1, train_images=1000, eval_images=500, calib_samples=128, bench_repeats=10, quantize="int8"),
        timeout_s=600,
        grid=grid(["resnet20"], ["l1", "cmi", "tucker"], [(0.5, None)]) + (Config("resnet20", "l1", 0.5, "macs"),)),
    "cpu": Suite(
        "cpu", "ResNet-20 and ResNet-56, every method, 1 epoch on 10,000 images (CPU)",
        Budget(epochs=1, train_images=10000, bench_repeats=50), timeout_s=1800,
        grid=tuple(c for target in FULL_GRID_TARGETS
                   for c in grid(["resnet20", "resnet56"], ALL_METHODS + tuple(VARIANTS), [target]))),
    "cpu-long": Suite(
        "cpu-long", "ResNet-56 at a third of the filters (params for tucker), 3 epochs on 20,000 images (CPU)",
        Budget(epochs=3, train_images=20000, bench_repeats=50), timeout_s=3600,
        grid=grid(["resnet56"], ("random", "l1", "cmi", "mipp", "tucker"), [(0.33, None)])),
    "gpu": Suite(
        "gpu", "ResNet-20 and ResNet-56, every method, 30 epochs on all 50,000 images (CUDA with AMP)",
        Budget(epochs=30, train_images=None, device="cuda", bench_repeats=100), timeout_s=4 * 3600,
        grid=grid(["resnet20", "resnet56"], ALL_METHODS + tuple(VARIANTS), FULL_GRID_TARGETS)),
    "sample": Suite(
        "sample", "The bundled sample network on the bundled shapes data: tries the harness without ../shared",
        Budget(epochs=1, train_images=200, batch_size=64, calib_samples=64, bench_batches=(1, 8), bench_repeats=3,
               quantize="int8"),
        timeout_s=300, grid=grid(["samplenet"], ["random", "l1"], [(0.33, None), (0.5, "macs")])),
    "deploy": Suite(
        "deploy", ("Deployment (issue 12): fp32 and INT8 of the original and the compressed graph, timed interleaved "
                   "on one thread; ResNet-56 (trained; 1 epoch on 10,000 images after compression) and torchvision's "
                   "ResNet-18, ResNet-50 and MobileNetV2 at 224x224 (random weights: latency only)"),
        Budget(epochs=1, train_images=10000, bench_repeats=50, threads=1, quantize="int8"), timeout_s=3600,
        grid=deploy_grid(),
        notes=("torchvision models: model code only, seeded random weights, 1000 classes, 224x224 noise images to "
               "calibrate INT8; their top-1 is meaningless and not shown: latency only",
               "tucker runs once: its ranks are not aligned by --round-to")),
    "cpu-hour-screen": Suite(
        "cpu-hour-screen", ("Issue 13's screening: ResNet-20 at half the MACs, every method (ours, l1, random, "
                            "torch-pruning's criteria), 5 minutes of fine-tuning each on one core (top-1 every "
                            "minute), fp32 and INT8"),
        cpu_hour_budget(5.0, 1.0), timeout_s=1800,
        grid=tuple(Config("resnet20", m, *HALF_MACS, CPU_HOUR_ROUND_TO) for m in CPU_HOUR_METHODS),
        notes=("run pinned to one core (taskset -c 0) with --threads 1 for every stage; fine-tuning minutes are wall "
               "clock on that core (the curve's own evaluations excluded)",)),
    "cpu-hour": Suite(
        "cpu-hour", ("Issue 13's hour: ResNet-56 at half the MACs, the best two of ours and the best two "
                     "torch-pruning criteria of cpu-hour-screen, 60 minutes of fine-tuning each on one core (top-1 "
                     "every 5 minutes), fp32 and INT8"),
        cpu_hour_budget(60.0, 5.0), timeout_s=3 * 3600, grid=(), selected_by="cpu-hour-screen",
        notes=("run pinned to one core (taskset -c 0) with --threads 1 for every stage; fine-tuning minutes are wall "
               "clock on that core (the curve's own evaluations excluded)",)),
}
#: order of the sections of docs/RESULTS.md
SUITE_ORDER = ("cpu", "cpu-long", "deploy", "cpu-hour-screen", "cpu-hour", "gpu", "smoke", "sample")
README_SUITES = ("cpu", "gpu")  # the README shows the first of these stored: smoke numbers are no advertisement


def resolve_method(label: str) -> tuple[str, dict[str, Any]]:
    """The ``--method`` and method options behind a grid label (a method name, or a :data:`VARIANTS` label)."""
    method, options = VARIANTS.get(label, (label, {}))
    return method, dict(options)


def data_root(spec: DataSpec, shared: Path) -> Path:
    return shared if spec.root == "shared" else SAMPLES  # "synthetic" data is made in the configuration's process


def filter_grid(suite: Suite, *, models: list[str] | None = None, methods: list[str] | None = None,
                targets: list[tuple[float, str | None]] | None = None) -> tuple[Config, ...]:
    """The suite's grid restricted to the given models / methods / (target, metric) pairs (None keeps all).

    A pair's metric None matches any metric; ``"default"`` matches the configurations using the method's default.
    """
    return tuple(c for c in suite.grid
                 if (models is None or c.model in models) and (methods is None or c.method in methods)
                 and (targets is None or any(abs(c.target - t) < 1e-9 and (m is None or (c.metric or "default") == m)
                                             for t, m in targets)))
