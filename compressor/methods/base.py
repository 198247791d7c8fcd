"""The ``Method`` protocol: every compression method, whatever it does, is one class with typed options.

In the spirit of scikit-learn's estimator contract: ``__init__`` only stores validated options, all work happens in
:meth:`Method.apply`, which never modifies its input and returns a :class:`MethodResult`:

* ``model``: the compressed copy;
* ``records``: JSON-friendly replay records (``{"kind": "prune" | "tucker" | "mask", ...}``) saved in
  ``compressed.pt`` and replayed by :func:`compressor.io.load_compressed` through :func:`replay`;
* ``report``: the method's section of the report (what it chose, how long it took);
* ``callbacks``: training callbacks for methods that keep acting during fine-tuning (tucker's rank-adaptive
  training); after training, each callback's ``records()`` and ``report()`` replace what the method returned.

A method reads only :class:`MethodContext`, never the whole run configuration.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError, ModelLoadError
from ..options import OptionSpec, parse_options, specs

METRICS = ("filters", "params", "macs")


@dataclass(frozen=True)
class Budget:
    """How a target is met: the fraction ``target`` of ``metric`` removed; pruning keeps channel counts at multiples of
    ``round_to`` where the target allows (``"auto"``: the multiple whose pruned graph is measured fastest, see
    :mod:`compressor.widths` and ``MethodContext.latency``), and at least ``ceil(min_keep * C)`` channels per group;
    groups of ``ignore_layers`` are never touched."""

    target: float
    metric: str = "filters"
    round_to: int | str = 8
    min_keep: float = 0.1
    ignore_layers: tuple[str, ...] = ()

    def scaled(self, target: float) -> Budget:
        """The same rules for another target (a chain's steps)."""
        return Budget(target, self.metric, self.round_to, self.min_keep, self.ignore_layers)


@dataclass
class MethodContext:
    """What a method may read.

    Attributes
    ----------
    example : torch.Tensor
        One zero input ``(1, C, H, W)``.
    original : nn.Module
        The uncompressed model: the denominator of every budget (a chain's later steps see it too).
    calib : iterable of (x, y) or None
        Normalised calibration batches (``--calib-samples`` images of ``--data``, no augmentation).
    train : iterable of (x, y) or None
        The fine-tuning loader (augmented), for methods that train while compressing.
    epochs : int
        Fine-tuning epochs that will follow (methods that act during training need at least one).
    threads : int or None
        The user's ``--threads`` (for methods that time candidates in onnxruntime).
    latency : callable or None
        With ``budget.round_to == "auto"``: times candidate models, ``{alignment: model} -> {alignment: p50 ms}``, on
        the graph the run ships (:class:`compressor.widths.OnnxLatency`); None: nothing is timed, ``auto`` means 8.
    train_config : compressor.training.TrainConfig or None
        The run's fine-tuning settings (``--lr``, ``--optimizer``, ``--weight-decay``, ``--seed``), for methods that
        train while compressing (``imp``'s rounds); they set their own ``epochs``.
    loader_for : callable or None
        ``loader_for(path, flag)``: a training loader like ``train`` (same normalisation, batch size, augmentation)
        over another dataset, checked against the model; ``flag`` names the option in its one-line errors.
    """

    example: torch.Tensor
    num_classes: int
    device: torch.device
    seed: int
    budget: Budget
    original: nn.Module
    calib: Any = None
    train: Any = None
    epochs: int = 0
    threads: int | None = None
    latency: Callable[[Mapping[int, nn.Module]], Mapping[int, float]] | None = None
    train_config: Any = None
    loader_for: Callable[[str, str], Any] | None = None


@dataclass
class MethodResult:
    """What :meth:`Method.apply` returns (see the module docstring)."""

    model: nn.Module
    records: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    #: Pruning methods: the original channel indices each Conv2d/Linear kept (``{name: {"in": [...], "out": [...]}}``),
    #: for the reconstruction stage (:mod:`compressor.reconstruct`); None when no channel was removed.
    channels: dict[str, dict[str, list[int]]] | None = None


@dataclass(frozen=True)
class NoOptions:
    """For methods without options."""


class Method(abc.ABC):
    """Base class of every method. Subclasses set the class attributes and implement :meth:`apply`.

    Class attributes: ``name`` (``--method`` value and flag prefix), ``summary`` (one line for ``--help``),
    ``Options`` (a frozen dataclass built with :func:`compressor.options.option`), ``default_metric``,
    ``metrics`` (target metrics it can meet), ``requires_data`` (needs ``--data`` calibration images),
    ``trains`` (acts during fine-tuning when some option says so; see :meth:`needs_epochs`), ``coarse`` (removes
    structure in steps larger than the budget's tolerance, e.g. whole blocks: it reaches the target and may pass it).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    default_metric: ClassVar[str] = "filters"
    metrics: ClassVar[tuple[str, ...]] = METRICS
    requires_data: ClassVar[bool] = False
    coarse: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Method:
        """Build from user values keyed by option name (no prefix); bad values raise one-line InputErrors."""
        return cls(parse_options(cls.Options, cls.name, values))

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        return specs(cls.Options, cls.name)

    def needs_epochs(self) -> bool:
        """True when the chosen options act during fine-tuning, so ``--epochs`` must be at least 1."""
        return False

    def check(self, ctx: MethodContext) -> None:
        """Refuse a context the method cannot work with (one line, before any work)."""
        if ctx.budget.metric not in self.metrics:
            raise InputError(f"--method {self.name} meets a target in {' or '.join(self.metrics)}; "
                             f"--target-metric {ctx.budget.metric} is not one of them")
        if self.requires_data and ctx.calib is None:
            raise InputError(f"--method {self.name} needs calibration data; pass --data")

    @abc.abstractmethod
    def apply(self, model: nn.Module, ctx: MethodContext) -> MethodResult:
        """Return the compressed copy of ``model``; ``model`` is not modified."""


Replayer = Callable[[nn.Module, Mapping[str, Any], torch.Tensor], nn.Module]
_REPLAYERS: dict[str, Replayer] = {}


def register_replay(kind: str, fn: Replayer) -> None:
    """Register how a record of ``kind`` re-applies its structure to a freshly built model."""
    _REPLAYERS[kind] = fn


def replay(model: nn.Module, records: Iterable[Mapping[str, Any]], example: torch.Tensor) -> nn.Module:
    """Re-apply ``records`` in order (weights are loaded afterwards by the caller)."""
    for record in records:
        kind = str(record.get("kind"))
        if kind not in _REPLAYERS:
            raise ModelLoadError(f"unknown transform {kind!r} in the saved model; upgrade compressor to load it")
        model = _REPLAYERS[kind](model, record, example)
    return model
