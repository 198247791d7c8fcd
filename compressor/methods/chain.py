"""Chains: ``cmi+tucker`` prunes, then factorises what remains, as one :class:`~compressor.methods.base.Method`.

Budget split (``--chain-split``, default 0.5): every step but the last removes ``split * target`` of the chain's
metric; the last step is given the whole ``target`` measured against the *original* model, so it removes only what
the earlier steps left over, and nothing when they alone met the target. ``tucker`` measures against
``ctx.original`` itself; a pruning method measures against the model it is given, so the chain hands it
:func:`remaining_target`. At most one channel-pruning step; only ``blocks`` (depth pruning) may come before it
(``blocks+l1``: remove blocks, then channels; ``cmi+tucker``: prune, then factorise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..errors import InputError
from ..options import option
from ..pruning import engine
from .base import Method, MethodContext, MethodResult
from .blocks import Blocks
from .prune import PruneMethod


@dataclass(frozen=True)
class ChainOptions:
    """Options of a chain of methods (``--method a+b``)."""

    split: float = option(0.5, help="share of --target removed by each step of a chain but the last (the last "
                                    "removes the rest, measured against the original model)", example="0.7",
                          low=0.0, high=1.0, low_open=True, high_open=True)


class Chain(Method):
    """Methods applied in order, each on the previous one's output (see the module docstring)."""

    name = "chain"  # the options prefix (--chain-split); an instance's ``label`` is e.g. "cmi+tucker"
    summary = "methods joined with '+' (e.g. cmi+tucker): prune, then factorise what remains"
    Options = ChainOptions

    def __init__(self, steps: Sequence[Method], options: ChainOptions | None = None) -> None:
        super().__init__(options)
        prunes = [i for i, s in enumerate(steps) if isinstance(s, PruneMethod)]
        if len(steps) < 2 or len(prunes) > 1 or (prunes and not all(isinstance(s, Blocks)
                                                                    for s in steps[:prunes[0]])):
            raise InputError(f"--method {'+'.join(s.name for s in steps)}: a chain has two or more methods with at "
                             "most one channel-pruning method, first or after blocks (e.g. cmi+tucker, blocks+l1)")
        self.steps = list(steps)
        self.label = "+".join(s.name for s in steps)
        self.default_metric = steps[-1].default_metric  # type: ignore[misc]
        self.metrics = tuple(m for m in steps[-1].metrics if all(m in s.metrics for s in steps))  # type: ignore[misc]
        self.requires_data = any(s.requires_data for s in steps)  # type: ignore[misc]

    def needs_epochs(self) -> bool:
        return any(s.needs_epochs() for s in self.steps)

    def apply(self, model: nn.Module, ctx: MethodContext) -> MethodResult:
        records: list[dict[str, Any]] = []
        report: dict[str, Any] = {"split": self.options.split}
        callbacks: list[Any] = []
        channels = None
        for i, step in enumerate(self.steps):
            target = ctx.budget.target
            if i < len(self.steps) - 1:
                target *= self.options.split
            elif isinstance(step, PruneMethod) and i > 0:
                target = remaining_target(ctx.budget.target, engine.measure(ctx.original, ctx.example,
                                                                            ctx.budget.metric),
                                          engine.measure(model, ctx.example, ctx.budget.metric))
                if target <= 0:
                    report[step.name] = {"skipped": "the earlier steps met the target"}
                    continue
            step_ctx = replace(ctx, budget=ctx.budget.scaled(target))
            step.check(step_ctx)
            result = step.apply(model, step_ctx)
            model = result.model
            records += result.records
            report.update(result.report)
            callbacks += result.callbacks
            channels = result.channels or channels  # the pruning step's; layers factorised later are skipped
        metric = ctx.budget.metric  # each step reports its own "achieved"; the chain's is against the original
        report["achieved"] = round(1.0 - engine.measure(model, ctx.example, metric)
                                   / engine.measure(ctx.original, ctx.example, metric), 4)
        return MethodResult(model, records, report, callbacks, channels)


def remaining_target(target: float, total: float, current: float) -> float:
    """The fraction of ``current`` to remove so that ``target`` of ``total`` (the original's metric) is removed in
    all: :math:`t_1 = 1 - (1 - t)\\,T_0 / T_1`; <= 0 when the earlier steps already met the target."""
    return 1.0 - (1.0 - target) * total / current
