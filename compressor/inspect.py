"""What a model is made of, before compressing it: layers, prunable channel groups and totals.

:func:`inspect_model` traces a model once with torch-pruning's dependency graph (the same graph the pruning engine
uses, so the groups shown are exactly the ones ``compress`` would prune) and measures per-layer MACs with
:func:`compressor.metrics.layer_macs`. Nothing is written and the model is left as it was (train/eval flags are
restored). :func:`inspect_checkpoint` does the same for a file, and :func:`render_summary` prints the result.

A *channel group* is the set of channels that must be removed together: its root layer's output channels, the
layers whose outputs are removed with them (several for a residual stream: every conv that adds into it) and the
layers whose inputs are removed with them (their consumers). Groups that touch the model's output layer or an
ignored layer are not prunable and are not listed.

Examples
--------
>>> import torch
>>> from compressor.models import create_model
>>> from compressor.inspect import inspect_model
>>> summary = inspect_model(create_model("resnet20"), torch.zeros(1, 3, 32, 32))
>>> summary.totals.params, summary.groups[0].out_layers[:2]
(269722, ('conv1', 'layer1.2.conv2'))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import InputError
from .io import load_model
from .metrics import count_filters, count_params, layer_macs
from .pruning.engine import PruningGroup, build_graph, discover_groups

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["ChannelGroup", "LayerInfo", "ModelSummary", "Totals", "inspect_checkpoint", "inspect_model",
           "render_summary"]


@dataclass(frozen=True)
class LayerInfo:
    """One ``Conv2d`` or ``Linear`` layer.

    Attributes
    ----------
    name, type : str
        Module name (``layer1.0.conv1``) and class name (``Conv2d``, ``Linear`` or a subclass).
    in_channels, out_channels : int
        Input/output channels (features for ``Linear``).
    kernel, stride : tuple of int or None
        Kernel size and stride of a conv; None for ``Linear``.
    groups : int
        Conv groups (``in_channels`` for a depthwise conv); 1 for ``Linear``.
    params : int
        The layer's own parameters (weight and bias).
    macs : int
        Multiply-accumulates for one image (see :mod:`compressor.metrics`); 0 when the forward pass never calls it.
    group : str or None
        Root of the channel group whose outputs this layer belongs to; None when its outputs are not prunable.
    """

    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    groups: int
    params: int
    macs: int
    group: str | None


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned together (see the module docstring).

    Attributes
    ----------
    root : str
        Layer whose output channels index the group (what ``--ignore-layer`` names).
    channels : int
        Number of channels in the group.
    out_layers : tuple of str
        Conv/Linear layers whose output channels are removed with the group.
    in_layers : tuple of str
        Conv/Linear layers whose input channels are removed with the group.
    """

    root: str
    channels: int
    out_layers: tuple[str, ...]
    in_layers: tuple[str, ...]

    @classmethod
    def from_pruning_group(cls, group: PruningGroup) -> ChannelGroup:
        """Copy of an engine :class:`~compressor.pruning.engine.PruningGroup`."""
        return cls(group.root, group.channels, tuple(group.out_layers), tuple(group.in_layers))


@dataclass(frozen=True)
class Totals:
    """Whole-model counts, as :mod:`compressor.metrics` defines them.

    Attributes
    ----------
    params : int
        All parameters (BatchNorm included), :func:`~compressor.metrics.count_params`.
    macs : int
        Conv/Linear MACs for one image, :func:`~compressor.metrics.count_macs`.
    filters : int
        Conv output channels, :func:`~compressor.metrics.count_filters`.
    layers : int
        Conv/Linear layers.
    groups, prunable_channels : int
        Prunable channel groups and the channels they hold together.
    """

    params: int
    macs: int
    filters: int
    layers: int
    groups: int
    prunable_channels: int


@dataclass(frozen=True)
class ModelSummary:
    """Everything :func:`inspect_model` found; ``to_dict()`` gives the ``--json`` output.

    Attributes
    ----------
    input_shape : tuple of int
        Per-image input shape the model was traced with, e.g. ``(3, 32, 32)``.
    layers : tuple of LayerInfo
        Conv/Linear layers in module order.
    groups : tuple of ChannelGroup
        Prunable channel groups in the engine's order.
    totals : Totals
    ignored : tuple of str
        Layers whose groups were excluded on request.
    arch, source : str or None
        Architecture and file, when the summary came from :func:`inspect_checkpoint`.
    """

    input_shape: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    groups: tuple[ChannelGroup, ...]
    totals: Totals
    ignored: tuple[str, ...] = ()
    arch: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists).

        >>> import json, torch
        >>> from compressor.models import create_model
        >>> s = inspect_model(create_model("samplenet"), torch.zeros(1, 3, 32, 32))
        >>> json.loads(json.dumps(s.to_dict()))["totals"]["params"]
        23098
        """
        return _lists(asdict(self))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def inspect_model(model: nn.Module, example: torch.Tensor, *, ignore: Sequence[str] = ()) -> ModelSummary:
    """Layers, prunable channel groups and totals of ``model``.

    Parameters
    ----------
    model : nn.Module
        The network; not modified (the train/eval flag of every module is restored).
    example : torch.Tensor
        An input batch ``(N, C, H, W)`` on the model's device; one image is enough.
    ignore : sequence of str
        Layer names whose groups are never pruned (``--ignore-layer``); unknown names raise ``InputError``.

    Returns
    -------
    ModelSummary

    Examples
    --------
    >>> from compressor.models import create_model
    >>> s = inspect_model(create_model("resnet20"), torch.zeros(1, 3, 32, 32), ignore=["conv1"])
    >>> [g.root for g in s.groups][:2], s.totals.filters
    (['layer1.0.conv1', 'layer1.1.conv1'], 688)
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() < 2 or example.shape[0] < 1:
        raise InputError("example must be a tensor with a batch axis, e.g. torch.zeros(1, 3, 32, 32)")
    flags = [(m, m.training) for m in model.modules()]
    try:
        _check_forward(model, example)
        groups = tuple(ChannelGroup.from_pruning_group(g)
                       for g in discover_groups(model, build_graph(model, example), ignore=tuple(ignore)))
        macs = layer_macs(model, example)
    finally:
        for module, training in flags:
            module.training = training
    owner = {layer: g.root for g in groups for layer in g.out_layers}
    layers = tuple(_layer_info(name, m, macs.get(name, 0), owner.get(name))
                   for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    totals = Totals(params=count_params(model), macs=sum(macs.values()), filters=count_filters(model),
                    layers=len(layers), groups=len(groups), prunable_channels=sum(g.channels for g in groups))
    return ModelSummary(tuple(int(d) for d in example.shape[1:]), layers, groups, totals, tuple(ignore))


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    """A model that cannot run ``example`` is bad input (wrong ``input_shape``), not a bug: say so in one line."""
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shape = "x".join(str(d) for d in example.shape[1:])
        raise InputError(f"the model does not run on a {shape} input ({first}); is the input shape right?") from exc


def _layer_info(name: str, module: nn.Module, macs: int, group: str | None) -> LayerInfo:
    params = count_params(module)
    if isinstance(module, nn.Conv2d):
        return LayerInfo(name, type(module).__name__, module.in_channels, module.out_channels,
                         tuple(module.kernel_size), tuple(module.stride), module.groups, params, macs, group)
    assert isinstance(module, nn.Linear)
    return LayerInfo(name, type(module).__name__, module.in_features, module.out_features, None, None, 1, params,
                     macs, group)


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: Sequence[int] | None = None,
    ignore: Sequence[str] = (),
) -> ModelSummary:
    """:func:`inspect_model` on a checkpoint, loaded as ``compress`` loads it (:func:`compressor.io.load_model`).

    Parameters
    ----------
    path : path-like
        Checkpoint, state_dict, ``compressed.pt`` or (with ``trust_pickle``) a pickled module.
    arch : str, optional
        As ``--arch``; optional when the checkpoint records it.
    trust_pickle : bool
        Allow unpickling a whole module (runs code).
    input_shape : sequence of int, optional
        Per-image shape ``(C, H, W)``; defaults to the architecture's. Required when it has none (a pickled module
        or a ``file.py:fn`` factory).
    ignore : sequence of str
        As in :func:`inspect_model`.

    Examples
    --------
    >>> s = inspect_checkpoint("samples/samplenet.pt")
    >>> s.arch, s.input_shape
    ('samplenet', (3, 32, 32))
    """
    loaded = load_model(path, arch=arch, trust_pickle=trust_pickle)
    shape = tuple(input_shape) if input_shape else loaded.input_shape
    if not shape:
        raise InputError(f"the input shape of --arch {loaded.arch} is unknown; pass it, e.g. --input-shape 3,32,32")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise InputError(f"input shape must be positive ints such as 3,32,32; got {shape}")
    summary = inspect_model(loaded.model, torch.zeros((1, *shape)), ignore=ignore)
    return replace(summary, arch=loaded.arch, source=loaded.source)


# ------------------------------------------------------------------------------------------------------ rendering
def human(n: float) -> str:
    """Short count for tables, three significant digits at most.

    >>> human(40_551_936), human(884_736), human(464)
    ('40.6 M', '885 K', '464')
    """
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {suffix}" if abs(value) >= 99.95 else f"{value:.1f} {suffix}"
    return f"{n:g}"


def _kernel_stride(layer: LayerInfo) -> str:
    if layer.kernel is None or layer.stride is None:
        return "-"
    return f"{_pair(layer.kernel)}/{_pair(layer.stride)}"


def _pair(value: tuple[int, ...]) -> str:
    return str(value[0]) if len(set(value)) == 1 else "x".join(str(v) for v in value)


def render_summary(summary: ModelSummary, *, console: Console | None = None) -> None:
    """Print ``summary`` as three rich tables (layers, channel groups, totals) on stdout or ``console``.

    >>> import torch
    >>> from compressor.models import create_model
    >>> render_summary(inspect_model(create_model("samplenet"), torch.zeros(1, 3, 32, 32)))  # doctest: +SKIP
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"{summary.arch or 'model'}" + (f" ({summary.source})" if summary.source else "")
    shape = "x".join(str(d) for d in summary.input_shape)
    layers = Table(title=f"{title}: Conv2d/Linear layers, input {shape}", box=box.SIMPLE_HEAD)
    rows = [(layer.name if layer.group else f"{layer.name} *", layer.type, str(layer.in_channels),
             str(layer.out_channels), _kernel_stride(layer),
             str(layer.groups), f"{layer.params:,}", human(layer.macs)) for layer in summary.layers]
    for i, col in enumerate(("layer", "type", "in", "out", "k/s", "groups", "params", "MACs")):
        widest = max([len(col)] + [len(row[i]) for row in rows])  # numbers are never cut; long names fold
        layers.add_column(col, justify="left" if i < 2 else "right", overflow="fold", min_width=min(widest, 12))
    for row in rows:
        layers.add_row(*row)
    layers.caption = "k/s: kernel/stride; *: outputs not prunable (model output, ignored or single channel)"
    groups = Table(title="prunable channel groups: channels removed together", box=box.SIMPLE_HEAD)
    for col in ("root", "channels", "outputs removed from", "inputs removed from"):
        groups.add_column(col, justify="right" if col == "channels" else "left", no_wrap=col == "root")
    for g in summary.groups:
        groups.add_row(g.root, str(g.channels), ", ".join(g.out_layers), ", ".join(g.in_layers))
    console.print(layers)
    console.print(groups)
    console.print(_totals_table(summary))


def _totals_table(summary: ModelSummary) -> Any:
    from rich import box
    from rich.table import Table

    t = summary.totals
    table = Table(title="totals", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("params", f"{t.params:,}"), ("MACs (one image)", f"{t.macs:,} ({human(t.macs)})"),
            ("filters", f"{t.filters:,}"), ("conv/linear layers", str(t.layers)),
            ("prunable groups", str(t.groups)), ("prunable channels", f"{t.prunable_channels:,}")]
    if summary.ignored:
        rows.append(("ignored", ", ".join(summary.ignored)))
    for row in rows:
        table.add_row(*row)
    return table
