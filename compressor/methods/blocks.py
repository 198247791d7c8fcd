"""``--method blocks``: remove whole residual blocks, least harmful first (depth pruning).

Why: at batch 1 on a CPU, a small network's latency is dominated by a cost per layer, not by its MACs. On ResNet-56
(CIFAR-10, onnxruntime, one thread) removing a third of the filters, 2.4x fewer MACs, made the INT8 graph only
1.0-1.3x faster than the INT8 original: every Conv node is still there. Removing blocks removes nodes
(``benchmarks/int8_floor.py`` times depth against width). torch-pruning removes channels, never layers, so this is
done here, in a few lines: a dropped block becomes ``nn.Identity``.

**Which blocks can go.** A block is droppable when it is *residual with an identity shortcut*, tested on the
calibration data rather than on class names: with all its parameters set to zero (its residual branch then outputs
zero) its output equals its input. This holds for ``y = relu(f(x) + x)`` after a ReLU (torchvision's and the CIFAR
ResNets' BasicBlock/Bottleneck without downsampling), ``y = x + f(x)`` (MobileNetV2's inverted residuals with a
shortcut, ConvNeXt blocks), and fails for shape-changing blocks, plain conv layers and projection shortcuts. Only
the innermost such modules are candidates (a stage made of droppable blocks is not itself one).

**Which go first** (ablation, greedy): the harm of dropping block ``b`` from the current network ``N`` is

.. math:: h(b) = \\frac{1}{n} \\sum_i \\mathrm{KL}\\big(\\,p_{\\text{orig}}(x_i) \\,\\|\\, p_{N \\setminus b}(x_i)\\big)

over the calibration images, with :math:`p` the softmax of the logits (the original model is the teacher; no labels
are needed). The block with the least harm is dropped, the harms are measured again on the smaller network (the
effect of dropping two blocks is not the sum of the two), until the removed fraction of ``--target-metric`` reaches
``--target``. Blocks are coarse (a stage-3 block of ResNet-56 holds 6% of its filters), so the target is met or
passed by less than one block; the report gives what was achieved and each step's harm. The criterion is the
block-ablation of Veit et al. 2016 ("Residual networks behave like ensembles of relatively shallow networks"), with
the KL to the original's predictions as the measure, as in discrimination-based block pruning (Wang et al., 2019).

``--blocks-max-harm`` stops early, leaving the target unmet with an error, when the next block would cost more than
that KL (nats): dropping layers is not graceful when too many go. Combine with channel pruning by running ``blocks``
first and then a pruning method on its output (``blocks+l1``, see :mod:`compressor.methods.chain`).

Record: ``{"kind": "blocks", "dropped": [names]}``; :func:`replay_blocks` replaces them by ``nn.Identity``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PruningError
from ..options import option
from ..pruning import engine
from .base import Method, MethodContext, MethodResult, register_replay
from .tucker_modules import set_module

__all__ = ["Blocks", "BlocksOptions", "ablation_harm", "droppable_blocks", "replay_blocks"]

#: Images of the calibration data used for the test and the harms (the first ones; more only costs time).
HARM_IMAGES = 256


@dataclass(frozen=True)
class BlocksOptions:
    max_harm: float = option(10.0, help="stop (target unmet: error) before a block whose removal costs more than this "
                                        "KL divergence (nats) from the original's predictions", example="1.0", low=0.0)


def _zeroed(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    return clone


def droppable_blocks(model: nn.Module, x: torch.Tensor, *, atol: float = 1e-6) -> list[str]:
    """Names of the innermost submodules of ``model`` whose output equals their input (same shape, max abs
    difference <= ``atol`` on the inputs they receive for ``x``) once their parameters are zero: residual blocks with
    an identity shortcut (see the module docstring). Modules without parameters or without a Conv2d are skipped."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    candidates = {name: m for name, m in model.named_modules()
                  if name and any(isinstance(c, nn.Conv2d) for c in m.modules())}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                inputs.setdefault(name, args[0].detach())
                outputs.setdefault(name, out.detach())
        return record

    was_training = model.training
    model.eval()
    try:
        for name, m in candidates.items():
            handles.append(m.register_forward_hook(hook(name)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    found = []
    for name, m in candidates.items():
        inp, out = inputs.get(name), outputs.get(name)
        if inp is None or out is None or inp.shape != out.shape:
            continue
        with torch.no_grad():
            zero = _zeroed(m).eval()(inp)
        if isinstance(zero, torch.Tensor) and zero.shape == inp.shape and float((zero - inp).abs().max()) <= atol:
            found.append(name)
    # innermost only: a module containing another candidate is a stage, not a block
    return [n for n in found if not any(o != n and o.startswith(n + ".") for o in found)]


def ablation_harm(reference: Sequence[torch.Tensor], logits: Iterable[torch.Tensor]) -> float:
    """Mean KL divergence ``KL(p_ref || p)`` (nats per image) between the softmax of ``reference`` logits (the
    original model's) and of ``logits`` (the network with a block removed), batch by batch."""
    total, n = 0.0, 0
    for ref, out in zip(reference, logits, strict=True):
        total += float(F.kl_div(F.log_softmax(out.float(), 1), F.log_softmax(ref.float(), 1), log_target=True,
                                reduction="sum"))
        n += ref.shape[0]
    return total / max(n, 1)


def _calib_images(calib: Any, n: int) -> list[torch.Tensor]:
    batches, seen = [], 0
    for x, *_ in calib:
        batches.append(x[: n - seen])
        seen += batches[-1].shape[0]
        if seen >= n:
            break
    return batches


def _logits(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x.to(device)).cpu() for x in batches]


class Blocks(Method):
    """Depth pruning: drop the residual blocks whose removal changes the predictions least (module docstring)."""

    name = "blocks"
    summary = "remove whole residual blocks, least harmful first (fewer layers: faster at batch 1)"
    Options = BlocksOptions
    requires_data = True
    coarse = True

    def apply(self, model: nn.Module, ctx: MethodContext) -> MethodResult:
        start = time.perf_counter()
        work = copy.deepcopy(model).to(ctx.device).eval()
        batches = _calib_images(ctx.calib, HARM_IMAGES)
        candidates = droppable_blocks(work, batches[0].to(ctx.device))
        if not candidates:
            raise PruningError("--method blocks found no residual block with an identity shortcut to remove "
                               "(it needs blocks whose output is input + branch); use a channel-pruning method")
        metric, target = ctx.budget.metric, ctx.budget.target
        ignored = [c for c in candidates if any(c == i or c.startswith(i + ".") for i in ctx.budget.ignore_layers)]
        candidates = [c for c in candidates if c not in ignored]
        total = engine.measure(ctx.original, ctx.example, metric)
        reference = _logits(copy.deepcopy(ctx.original).to(ctx.device).eval(), batches, ctx.device)  # not moved
        steps: list[dict[str, Any]] = []
        dropped: list[str] = []
        achieved = 1.0 - engine.measure(work, ctx.example, metric) / total
        while achieved < target - 1e-9:
            if not candidates:
                raise PruningError(f"target {target:.2f} of {metric} is not reachable by removing blocks: all "
                                   f"{len(dropped)} removable ones remove {achieved:.3f}; lower --target or add a "
                                   "channel-pruning step (blocks+l1)")
            harms = {}
            for name in candidates:
                original = work.get_submodule(name)
                set_module(work, name, nn.Identity())
                harms[name] = ablation_harm(reference, _logits(work, batches, ctx.device))
                set_module(work, name, original)
            best = min(candidates, key=lambda n: (harms[n], candidates.index(n)))
            if harms[best] > self.options.max_harm:
                raise PruningError(f"target {target:.2f} of {metric} needs more blocks than --blocks-max-harm "
                                   f"{self.options.max_harm:g} allows: after {len(dropped)} removed ({achieved:.3f} "
                                   f"of {metric}) the least harmful costs KL {harms[best]:.3g}; lower --target or "
                                   "raise --blocks-max-harm")
            set_module(work, best, nn.Identity())
            candidates.remove(best)
            dropped.append(best)
            achieved = 1.0 - engine.measure(work, ctx.example, metric) / total
            steps.append({"block": best, "harm_kl": round(harms[best], 5), "achieved": round(achieved, 4)})
        report = {"metric": metric, "target": target, "achieved": round(achieved, 4), "dropped": dropped,
                  "steps": steps, "candidates": len(dropped) + len(candidates), "ignored": ignored,
                  "harm_images": sum(b.shape[0] for b in batches), "seconds": round(time.perf_counter() - start, 2)}
        return MethodResult(work.cpu(), [{"kind": "blocks", "dropped": dropped}], report)


def replay_blocks(model: nn.Module, record: Mapping[str, Any], example: torch.Tensor) -> nn.Module:
    """Replace every block of ``record["dropped"]`` by ``nn.Identity`` (in place; returns ``model``)."""
    for name in record["dropped"]:
        set_module(model, name, nn.Identity())
    return model


register_replay("blocks", replay_blocks)
