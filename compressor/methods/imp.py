"""``--method imp``: iterative magnitude pruning with rewinding, as a :class:`~compressor.methods.base.Method`.

``--imp-rounds R`` rounds of *prune -> rewind -> retrain* (Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR
2019; Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020;
Renda, Frankle & Carbin, "Comparing Rewinding and Fine-tuning in Neural Network Pruning", ICLR 2020). Each round
removes the same fraction :func:`round_fraction` of what is left, so that the R rounds together meet ``--target``
(:func:`cumulative_target`); the input is already trained, so round 1 starts by pruning it.

* ``--imp-granularity filter`` (default): structured IMP. Each round is an :class:`~compressor.methods.baselines.L1`
  filter-pruning step (torch-pruning groups, physical channel removal, one ``prune`` replay record per round) that
  takes the model from the previous round to the round's cumulative target in ``--target-metric`` (filters by
  default), measured against the input. The ONNX graph really shrinks.
* ``--imp-granularity weight``: the papers' unstructured global magnitude pruning over every Conv and Linear weight
  (:mod:`compressor.methods.masks`); ``--target`` is the fraction of those weights set to zero (``--target-metric``
  filters or params; macs is refused: dense kernels do the same multiplications). The masks stay in force through
  every round and the final fine-tuning (:class:`~compressor.methods.masks.MaskKeeper`), are saved as buffers with a
  ``mask`` record, and export as zeros. Dense runtimes (onnxruntime's CPU kernels) do not run faster on unstructured
  zeros: the benchmark still runs and shows it; the gain is the deflated file size.

Rewinding (``--imp-rewind``): after each pruning step the surviving weights are reset to the rewind point, then
retrained for ``--imp-epochs`` epochs on ``--imp-data`` (default ``--data``) with the run's ``--lr``,
``--optimizer``, ``--weight-decay`` and the one :class:`~compressor.training.Trainer`:

* ``original``: the trained input weights (the compression use; with ``--imp-epochs 0`` it is one-shot magnitude
  pruning, since every round ranks the same weights);
* ``init``: a seeded re-initialisation of the architecture (:func:`compressor.models.reinitialise` with ``--seed``,
  the weights ``--at-init`` uses): the lottery-ticket setting. It is not the initialisation the input was trained from,
  which a checkpoint does not record;
* ``epoch:K``: the weights after K epochs of a *recorded run*: ``--imp-run DIR``, a directory holding
  ``epoch-K.pt`` (a ``state_dict`` of the input's architecture, saved with ``torch.save``; ``epoch-0.pt`` is the
  initialisation). :class:`RecordEpochs` is a Trainer callback that writes such a directory.

Buffers (BatchNorm statistics) are rewound with the weights. With filter granularity the rewind point is pruned by
replaying the rounds' records on a copy of it, so the surviving channels get exactly their rewind-point values.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from ..errors import InputError
from ..io import atomic_save, load_state_strict
from ..options import option
from ..pruning import engine
from ..threads import ThreadPolicy
from ..training import Callback, TrainConfig, Trainer, TrainState
from .base import Method, MethodContext, MethodResult, replay
from .baselines import L1
from .masks import MaskKeeper, apply_masks, global_magnitude_masks, prunable_layers, sparsity, weight_of

GRANULARITIES = ("filter", "weight")
_EPOCH = re.compile(r"epoch:(\d+)")
DENSE_NOTE = ("unstructured zeros do not make dense runtimes faster: onnxruntime's CPU kernels multiply every weight, "
              "zero or not, so latency stays that of the dense graph (see the benchmark); the gain is the file size "
              "after deflate (onnx_deflated_bytes) and what a sparse runtime could exploit")


# ------------------------------------------------------------------------------------------------ the schedule
def round_fraction(target: float, rounds: int) -> float:
    """Fraction of the *remaining* weights each of ``rounds`` equal rounds removes so that together they remove
    ``target``: :math:`p = 1 - (1 - t)^{1/R}`, since :math:`(1 - p)^R = 1 - t`.

    Frankle & Carbin (ICLR 2019) and open_lth fix :math:`p = 0.2` and let the number of rounds set the sparsity;
    here the rounds and target are given. ``round_fraction(0.8, 1) == 0.8``; ``round_fraction(0.488, 3) ~ 0.2``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target must be in [0, 1); got {target}")
    return 1.0 - (1.0 - target) ** (1.0 / rounds)


def cumulative_target(target: float, rounds: int, done: int) -> float:
    """Fraction of the input removed after ``done`` of ``rounds`` rounds: :math:`1 - (1 - p)^r` with ``p`` from
    :func:`round_fraction`, i.e. :math:`1 - (1 - t)^{r/R}` (``target`` exactly after the last round)."""
    if done >= rounds:
        return target
    return 1.0 - (1.0 - round_fraction(target, rounds)) ** done


def step_target(goal: float, *, original_total: float, current_total: float) -> float:
    """Fraction of the *current* model to remove so that ``goal`` of the original is removed:
    :math:`1 - (1 - g)\\,T_0 / T_1`; it absorbs what rounding to channel multiples did in earlier rounds."""
    return 1.0 - (1.0 - goal) * original_total / current_total


# -------------------------------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class IMPOptions:
    """Options of ``--method imp`` (flags ``--imp-<name>``)."""

    rounds: int = option(3, low=1, example="5", help="prune -> rewind -> retrain rounds; each removes the same "
                         "fraction 1 - (1 - target)^(1/rounds) of what is left")
    granularity: str = option("filter", choices=GRANULARITIES, example="weight",
                              help="filter = structured: whole channels physically removed (smaller, faster ONNX); "
                                   "weight = unstructured global magnitude masks over Conv and Linear weights "
                                   "(zeros; dense runtimes do not get faster)")
    rewind: str = option("original", example="epoch:2",
                         help="weights the survivors are reset to after each pruning step: original (the trained "
                              "input), init (a seeded initialisation, the lottery-ticket setting) or epoch:K (after "
                              "K epochs of the recorded run given by --imp-run)")
    run: str | None = option(None, example="runs/resnet20",
                             help="a recorded run for --imp-rewind epoch:K: a directory of epoch-K.pt state_dicts of "
                                  "the input's architecture (epoch-0.pt = the initialisation)")
    epochs: int = option(1, low=0, example="2", help="training epochs per round (0: prune and rewind only)")
    data: str | None = option(None, example="distilled.npz",
                              help="data the rounds retrain on (e.g. a distilled set); default --data")

    def __post_init__(self) -> None:
        if self.rewind not in ("original", "init") and not _EPOCH.fullmatch(self.rewind):
            raise InputError(f"--imp-rewind must be original, init or epoch:K (K an integer >= 0); got "
                             f"{self.rewind!r}")
        if _EPOCH.fullmatch(self.rewind) and self.run is None:
            raise InputError(f"--imp-rewind {self.rewind} rewinds to a recorded run, and none was given; pass "
                             "--imp-run DIR (a directory of epoch-K.pt state_dicts) or use --imp-rewind original")

    def run_file(self) -> Path | None:
        """``DIR/epoch-K.pt`` for ``--imp-rewind epoch:K``, else None."""
        found = _EPOCH.fullmatch(self.rewind)
        return Path(str(self.run)) / f"epoch-{int(found.group(1))}.pt" if found else None


# --------------------------------------------------------------------------------------------------- the method
class IMP(Method):
    """Iterative magnitude pruning with rewinding (see the module docstring)."""

    name = "imp"
    summary = "iterative magnitude pruning with rewinding (Frankle & Carbin 2019); filters or unstructured weights"
    Options = IMPOptions

    def check(self, ctx: MethodContext) -> None:
        super().check(ctx)
        opts = self.options
        if opts.granularity == "weight" and ctx.budget.metric == "macs":
            raise InputError("--imp-granularity weight zeroes weights but keeps every multiplication of a dense "
                             "runtime; use --target-metric params (or filters), or --imp-granularity filter")
        if opts.epochs > 0 and opts.data is None and ctx.train is None:
            raise InputError(f"--method imp retrains {opts.epochs} epoch(s) per round; pass --data or --imp-data, "
                             "or --imp-epochs 0")
        path = opts.run_file()
        if path is not None and not path.is_file():
            raise InputError(f"--imp-rewind {opts.rewind}: the recorded run has no {path.name} in {opts.run}; "
                             "record one (compressor.methods.imp.RecordEpochs) or rewind to another epoch")

    def apply(self, model: nn.Module, ctx: MethodContext) -> MethodResult:
        opts = self.options
        loader = ctx.train
        if opts.epochs > 0 and opts.data is not None:
            if ctx.loader_for is None:
                raise InputError("--imp-data needs a run that can build loaders (use compressor.compress)")
            loader = ctx.loader_for(opts.data, "--imp-data")
        rounds = _Rounds(ctx, loader if opts.epochs > 0 else None, opts)
        start = rewind_point(model, opts, seed=ctx.seed)
        facts = {"granularity": opts.granularity, "rounds": opts.rounds, "rewind": opts.rewind,
                 "round_fraction": round(round_fraction(ctx.budget.target, opts.rounds), 6),
                 "epochs_per_round": opts.epochs, "data": opts.data or "--data",
                 "train_images": len(getattr(rounds.loader, "dataset", ())) if rounds.loader is not None else 0}
        if opts.granularity == "filter":
            return _filter_imp(model, start, ctx, rounds, facts)
        return _weight_imp(model, start, ctx, rounds, facts)


def rewind_point(model: nn.Module, opts: IMPOptions, *, seed: int) -> nn.Module:
    """The dense model the survivors are reset to (a copy; ``model`` is not modified)."""
    if opts.rewind == "original":
        return copy.deepcopy(model).cpu()
    if opts.rewind == "init":
        return models.reinitialise(model, seed=seed).cpu()
    path = opts.run_file()
    assert path is not None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises anything on a corrupt file
        raise InputError(f"--imp-run: {path} is not a state_dict saved with torch.save ({type(exc).__name__})") \
            from None
    if not isinstance(state, dict):
        raise InputError(f"--imp-run: {path} holds a {type(state).__name__}, not a state_dict")
    rewound = copy.deepcopy(model).cpu()
    load_state_strict(rewound, state, what=f"the input model ({path} of --imp-run)")
    return rewound


class _Rounds:
    """Retraining of one round with the one Trainer, and the round's report row."""

    def __init__(self, ctx: MethodContext, loader: Any, opts: IMPOptions) -> None:
        self.ctx, self.loader, self.opts = ctx, loader, opts
        self.rows: list[dict[str, Any]] = []

    def retrain(self, model: nn.Module, index: int, callbacks: list[Callback], row: dict[str, Any]) -> nn.Module:
        row = {"round": index, **row}
        if self.loader is not None:
            base = self.ctx.train_config if self.ctx.train_config is not None else TrainConfig(epochs=0)
            config = replace(base, epochs=self.opts.epochs, budget_seconds=None, seed=base.seed + index)

            def log(line: str) -> None:
                print(f"imp round {index}/{self.opts.rounds}: {line}", file=sys.stderr, flush=True)

            with ThreadPolicy(self.ctx.threads).apply("train"):
                result = Trainer(config, device=self.ctx.device, log=log).fit(model, self.loader,
                                                                                callbacks=callbacks)
            model = result.model.cpu()
            last = result.history[-1] if result.history else {}
            row["train"] = {"epochs": result.epochs, "loss": last.get("loss"), "train_acc": last.get("train_acc"),
                            "seconds": round(result.seconds, 3)}
        self.rows.append(row)
        return model.eval()


def _filter_imp(model: nn.Module, start: nn.Module, ctx: MethodContext, rounds: _Rounds,
                facts: dict[str, Any]) -> MethodResult:
    """Structured IMP: per round an L1 filter-pruning step to the round's cumulative target, the rewind point pruned
    to the same channels (replaying every round's record on a copy), retraining."""
    metric, target = ctx.budget.metric, ctx.budget.target
    total = engine.measure(model, ctx.example, metric)
    current, records = copy.deepcopy(model).cpu().eval(), []
    step_ctx = replace(ctx, latency=None)  # --round-to auto is not timed per round: it means 8 (widths.UNTIMED)
    for index in range(1, rounds.opts.rounds + 1):
        goal = cumulative_target(target, rounds.opts.rounds, index)
        step = step_target(goal, original_total=total, current_total=engine.measure(current, ctx.example, metric))
        row: dict[str, Any] = {"goal": round(goal, 6), "step_target": round(step, 6)}
        if step > 0:
            pruned = L1().apply(current, replace(step_ctx, budget=ctx.budget.scaled(step)))
            records += pruned.records
            row["groups"] = [{"root": g["root"], "channels": g["channels"], "keep": g["keep"]}
                             for g in pruned.report["groups"]]
        current = replay(copy.deepcopy(start), records, ctx.example).eval()
        row["achieved"] = round(1.0 - engine.measure(current, ctx.example, metric) / total, 6)
        current = rounds.retrain(current, index, [], row)
    facts["rounds_detail"] = rounds.rows
    facts["reconstruction"] = "not applicable: the rounds retrained the pruned network"
    return MethodResult(current, records, {"imp": facts})


def _weight_imp(model: nn.Module, start: nn.Module, ctx: MethodContext, rounds: _Rounds,
                facts: dict[str, Any]) -> MethodResult:
    """Unstructured IMP: per round global magnitude masks to the round's cumulative target (a count of weights), the
    rewind point with the masks applied, retraining with the masks kept."""
    names = list(prunable_layers(model, ctx.budget.ignore_layers))
    if not names:
        raise InputError("--imp-granularity weight found no Conv or Linear weight to prune (all in --ignore-layers?)")
    total = sum(weight_of(model.get_submodule(n)).numel() for n in names)
    current, masks = copy.deepcopy(model).cpu().eval(), None
    record = {"kind": "mask", "layers": names}
    for index in range(1, rounds.opts.rounds + 1):
        goal = cumulative_target(ctx.budget.target, rounds.opts.rounds, index)
        removed = 0 if masks is None else sum(int((~m).sum()) for m in masks.values())
        count = max(0, math.floor(goal * total + 0.5) - removed)
        masks = global_magnitude_masks(current, names, count=count, previous=masks)
        current = apply_masks(copy.deepcopy(start), masks).eval()
        row = {"goal": round(goal, 6), "pruned_this_round": count,
               "achieved": round(sum(int((~m).sum()) for m in masks.values()) / total, 6)}
        current = rounds.retrain(current, index, [MaskKeeper(record)], row)
    measured = sparsity(current)
    facts.update(rounds_detail=rounds.rows, sparsity=measured, note=DENSE_NOTE)
    report = {"imp": facts, "target_metric": "conv+linear weights", "achieved": measured["overall"]}
    return MethodResult(current, [record], report, callbacks=[MaskKeeper(record)])


# ------------------------------------------------------------------------------------------- recording a run
class RecordEpochs(Callback):
    """Records a run for ``--imp-rewind epoch:K``: writes ``folder/epoch-0.pt`` (the weights at the start) and
    ``folder/epoch-K.pt`` after each epoch K, each the model's ``state_dict`` on the CPU, atomically.

    >>> Trainer(TrainConfig(epochs=3)).fit(model, loader, callbacks=[RecordEpochs("runs/r20")])  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _save(self, state: TrainState, epoch: int) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
        atomic_save(lambda p: torch.save(weights, p), self.folder / f"epoch-{epoch}.pt")

    def on_train_start(self, state: TrainState) -> None:
        self._save(state, 0)

    def on_epoch_end(self, state: TrainState) -> None:
        self._save(state, state.epoch)
