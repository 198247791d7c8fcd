"""Structural transforms: the steps a method applies to a model, recorded so that a saved model can be rebuilt.

A method is one transform or several joined with ``+`` (``cmi+tucker`` prunes, then factorises what remains).
Each transform returns the new model, a *record* saved in ``compressed.pt`` (tensors, strings, numbers, lists and
dicts only, so the file loads with ``torch.load(weights_only=True)``) and facts for the report.
:func:`compressor.io.load_compressed` replays the records on a freshly built architecture, then loads the weights.

* ``prune``: any registered channel scorer (``l1``, ``random``, ...) through :mod:`compressor.pruning.engine`;
  the record is torch-pruning's pruning history.
* other kinds (``tucker``) register themselves with :func:`register_transform`.
"""

from __future__ import annotations

import abc
import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .config import CompressConfig
from ._registry import Registry
from .errors import InputError, ModelLoadError, UnknownNameError
from .pruning import engine
from .pruning.scorers import ScoringContext, get_scorer, list_scorers


@dataclass
class TransformContext:
    """What a transform may read. ``original`` is the uncompressed model (the denominator of every budget)."""

    example: torch.Tensor
    num_classes: int
    cfg: CompressConfig
    device: torch.device
    original: nn.Module
    calib: Any = None
    metric: str = "filters"


@dataclass
class TransformResult:
    model: nn.Module
    record: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


class Transform(abc.ABC):
    """One structural step. ``__init__`` only stores options; :meth:`apply` works on a copy, never in place."""

    kind: ClassVar[str]
    default_metric: ClassVar[str] = "filters"
    requires_data: ClassVar[bool] = False

    @abc.abstractmethod
    def apply(self, model: nn.Module, ctx: TransformContext) -> TransformResult:
        """Return the transformed copy of ``model`` with its record and report facts."""

    @classmethod
    @abc.abstractmethod
    def replay(cls, model: nn.Module, record: Mapping[str, Any], example: torch.Tensor) -> nn.Module:
        """Re-apply ``record``'s structure to ``model`` (weights are loaded afterwards)."""


_TRANSFORMS: Registry[type[Transform]] = Registry("transform")


def register_transform(cls: type[Transform]) -> type[Transform]:
    """Class decorator registering a transform under ``cls.kind``; ``kind`` is also its method name."""
    return _TRANSFORMS.add(cls.kind, cls)


def get_transform(kind: str) -> type[Transform]:
    if kind not in _TRANSFORMS:
        raise ModelLoadError(f"unknown transform {kind!r} in the saved model; upgrade compressor to load it")
    return _TRANSFORMS.get(kind)


def list_methods() -> list[str]:
    """Method names: every channel scorer, and every other registered transform (combine them with ``+``)."""
    return sorted(set(list_scorers()) | {k for k in _TRANSFORMS.names() if k != PruneTransform.kind})


def plan(method: str) -> list[Transform]:
    """The transforms of ``method`` (``l1``, ``tucker``, ``cmi+tucker``...); at most one pruning step, first."""
    steps: list[Transform] = []
    for part in method.split("+"):
        if part in list_scorers():  # in a chain, pruning takes PRUNE_SHARE of --target, the factorisation the rest
            steps.append(PruneTransform(part, target_share=PRUNE_SHARE if "+" in method else 1.0))
        elif part in _TRANSFORMS and part != PruneTransform.kind:
            steps.append(_TRANSFORMS.get(part)())
        else:
            raise UnknownNameError("method", part, list_methods())
    prunes = [i for i, s in enumerate(steps) if isinstance(s, PruneTransform)]
    if len(prunes) > 1 or (prunes and prunes[0] != 0):
        raise InputError(f"--method {method}: at most one pruning method, first (e.g. cmi+tucker)")
    return steps


def check_method_options(method: str, options: Mapping[str, Any]) -> None:
    """Method options are namespaced ``<method>_<name>``; one for a method not in the chain is an error."""
    names = method.split("+")
    for key in options:
        if not any(key.startswith(f"{name}_") for name in names):
            owner = key.split("_", 1)[0]
            raise InputError(f"option {key!r} applies to --method {owner}, not to --method {method}")


def requires_data(steps: list[Transform]) -> bool:
    return any(s.requires_data for s in steps)


def default_metric(steps: list[Transform]) -> str:
    """``filters`` for pruning alone; the factorisation's metric (``params``) when one is involved."""
    return steps[-1].default_metric


PRUNE_SHARE = 0.5


@register_transform
class PruneTransform(Transform):
    """Physical channel pruning ranked by a registered scorer (see :mod:`compressor.pruning.scorers`)."""

    kind = "prune"

    def __init__(self, scorer: str = "l1", *, target_share: float = 1.0) -> None:
        self.scorer = scorer
        self.target_share = target_share
        self.requires_data = get_scorer(scorer).requires_data  # type: ignore[misc]

    def apply(self, model: nn.Module, ctx: TransformContext) -> TransformResult:
        cfg, example = ctx.cfg, ctx.example
        target = cfg.target * self.target_share
        graph = engine.build_graph(model, example)
        groups = engine.discover_groups(model, graph, ignore=cfg.ignore_layers)
        if not groups:
            raise InputError("the model has no prunable channel groups (no Conv2d/Linear feeding another layer)")
        own = {k: v for k, v in cfg.method_options.items() if k.startswith(f"{self.scorer}_")}
        options = {"min_keep": cfg.min_keep, "round_to": cfg.round_to, **own}
        scoring = ScoringContext(model=model, graph=graph, groups=groups, example_input=example, target=target,
                                 metric=ctx.metric, device=ctx.device, seed=cfg.seed, calib=ctx.calib,
                                 num_classes=ctx.num_classes, options=options)
        start = time.perf_counter()
        scored = get_scorer(self.scorer)(**own).score(scoring)
        scoring_seconds = time.perf_counter() - start
        keep = scored.keep
        if keep is None:
            keep = engine.allocate_uniform(model, example, groups, scored.scores, target=target, metric=ctx.metric,
                                           min_keep=cfg.min_keep, round_to=cfg.round_to).keep
        pruned = copy.deepcopy(model)
        pruned_graph = engine.build_graph(pruned, example)
        with torch.no_grad():
            reference = model(example).shape
            engine.apply_keep(pruned, pruned_graph, groups, scored.scores, keep, check=_output_check(example, reference))
        info = {"scorer": self.scorer, "prune_target": target, "scoring_seconds": round(scoring_seconds, 4),
                "groups": [{"root": g.root, "channels": g.channels, "keep": int(keep[g.root]),
                            "layers": list(g.out_layers)} for g in groups], **scored.info}
        record = {"kind": self.kind, "history": [list(step) for step in pruned_graph.pruning_history()]}
        return TransformResult(pruned.eval(), record, info)

    @classmethod
    def replay(cls, model: nn.Module, record: Mapping[str, Any], example: torch.Tensor) -> nn.Module:
        graph = engine.build_graph(model, example)
        graph.load_pruning_history([list(step) for step in record["history"]])
        return model


def _output_check(example: torch.Tensor, reference: torch.Size):
    """A check run after each pruned group: same output shape, finite values."""

    def check(model: nn.Module) -> None:
        out = model(example)
        if out.shape != reference or not torch.isfinite(out).all():
            raise ValueError(f"output shape {tuple(out.shape)} (expected {tuple(reference)}) or non-finite values")

    return check
