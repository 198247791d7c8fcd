"""Chains: ``cmi+tucker`` prunes, then factorises what remains, as one :class:`~compressor.methods.base.Method`.

Budget split (``--chain-split``, default 0.5): the pruning step removes ``split * target`` of the chain's metric;
the last step is given the whole ``target`` measured against the *original* model, so it removes only what pruning
left over (``tucker`` does this with ``ctx.original``), and nothing when pruning alone met the target. At most one
pruning step, and it comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..errors import InputError
from ..options import option
from .base import Method, MethodContext, MethodResult
from .prune import PruneMethod


@dataclass(frozen=True)
class ChainOptions:
    """Options of a chain of methods (``--method a+b``)."""

    split: float = option(0.5, help="share of --target removed by the pruning step of a chain (the factorisation "
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
        if len(steps) < 2 or len(prunes) > 1 or (prunes and prunes[0] != 0):
            raise InputError(f"--method {'+'.join(s.name for s in steps)}: a chain has two or more methods with at "
                             "most one pruning method, first (e.g. cmi+tucker)")
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
        for step in self.steps:
            share = self.options.split if isinstance(step, PruneMethod) else 1.0
            step_ctx = replace(ctx, budget=ctx.budget.scaled(ctx.budget.target * share))
            step.check(step_ctx)
            result = step.apply(model, step_ctx)
            model = result.model
            records += result.records
            report.update(result.report)
            callbacks += result.callbacks
            channels = result.channels or channels  # the pruning step's; layers factorised later are skipped
        return MethodResult(model, records, report, callbacks, channels)
