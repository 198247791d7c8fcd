"""Rank-adaptive fine-tuning of Tucker-2 factorised convolutions (``--tucker-adaptive``, tolerance ``--tau``; issue 5).

A simplified form of the rank-adaptive basis-update-and-Galerkin (BUG) integrator for Tucker tensors of Zangrando,
Schotthöfer, Ceruti, Kusch & Tudisco, "Geometry-aware training of factorized layers in tensor Tucker format"
(arXiv:2305.19059). Each factorised convolution :math:`W = \\mathcal{G} \\times_0 U_{out} \\times_1 U_{in}` keeps
its factors with orthonormal columns; the factors are not trained by the optimiser, they move only through the
cycle below, run every ``period`` steps:

1. **Basis augmentation** (first step of a cycle): with :math:`G_i = \\partial L / \\partial U_i` from that step's
   backward pass, :math:`\\hat U_i = \\mathrm{qr}([U_i \\mid G_i])` truncated to :math:`\\min(2 r_i, C_i)` columns.
   Its first :math:`r_i` columns span :math:`U_i` (they are :math:`U_i` up to signs, replaced by :math:`U_i`), so the
   core projected onto the new bases, :math:`\\mathcal{G} \\times_i \\hat U_i^\\top U_i`, is :math:`\\mathcal{G}`
   padded with zeros and the network function is unchanged. The span of :math:`[U \\mid G]` is the span of
   :math:`[U \\mid U - \\eta G]`, the K-step of the BUG integrator.
2. **Galerkin steps** (the other ``period - 1`` steps): the optimiser trains the core (and every parameter that is
   not a factor: BatchNorm, classifier, dense convs) with the augmented bases fixed.
3. **Truncation** (last step of a cycle): for each mode, the SVD of the core's unfolding
   :math:`\\mathcal{G}_{(i)} = P \\Sigma Q^\\top`; the new rank is the smallest :math:`r` with
   :math:`\\|\\Sigma_{r:}\\|_F \\le \\tau \\|\\mathcal{G}\\|_F` (at least 1), :math:`U_i \\leftarrow U_i P_{:, :r}` and
   :math:`\\mathcal{G} \\leftarrow \\mathcal{G} \\times_i P_{:, :r}^\\top` (both modes cut from the same core, HOSVD
   style).

Ranks therefore grow (at most double per cycle) where the gradient finds new directions the Galerkin steps use, and
shrink where the core's spectrum decays below the tolerance. The SGD momentum buffer of the core is a linear
function of it and is projected along in both steps (zero-padded, then cut by the same :math:`P`). Departures from
the paper, for simplicity: augmentation and truncation happen every ``period`` steps instead of every step, the
factor gradient is the one of a single batch, and plain SGD with momentum (no Adam) trains the core.

One addition for ``--rank-rule target``: with ``AdaptiveConfig.metric`` set, each truncation also keeps the
factorised layers' total params (or MACs) at its starting value, dropping the smallest and restoring the largest
relative singular values across all layers (:func:`_budget_ranks`); ``tau`` alone would shrink the model below the
requested budget (ResNet-56 at ``--target 0.33`` and ``tau = 0.1``: 40.5% of the parameters removed after the first
truncation) or let it grow past it.

At the end each factorised layer is written back as the plain ``nn.Sequential`` of
:func:`compressor.methods.tucker.tucker_block` with the final ranks (a 1x1 at full rank folded into the core); a
layer whose final ranks no longer lower both its params and MACs is written back as the dense conv it represents
and leaves the record. :func:`adaptive_finetune` returns the record to save, so that ``load_compressed`` replays
exactly what was trained.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressorError, DataError, InputError
from ..factorize import ConvShape, tucker2_cost, tucker2_shrinks
from ..finetune import _Progress, cosine_lr, evaluate
from .tucker import _set_module, tucker_block

__all__ = ["AdaptiveConfig", "AdaptiveResult", "AdaptiveTucker", "adaptive_finetune", "truncation_rank"]



@dataclass(frozen=True)
class AdaptiveConfig:
    """Options of :func:`adaptive_finetune`: ``tau`` in (0, 1), ``period`` >= 2 steps per augment/truncate cycle,
    SGD ``lr`` (cosine schedule), ``momentum`` (Nesterov) and ``weight_decay``, ``epochs`` and ``seed``.

    ``metric`` (``params`` or ``macs``) holds the factorised layers' total of that metric at what it was at the start
    (within one rank step), so a ``--target`` met by the factorisation stays met: each truncation cuts to the
    ``tau``-ranks, then moves rank between layers and modes to spend exactly that budget (:func:`_budget_ranks`).
    ``None`` lets ``tau`` alone decide (the paper's setting; the model may shrink or grow).
    """

    epochs: int
    lr: float = 0.01
    tau: float = 0.1
    period: int = 5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    metric: str | None = "params"

    def validate(self) -> AdaptiveConfig:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 0, f"--epochs must be >= 0; got {self.epochs!r}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0; got {self.lr!r}"),
            (0.0 < self.tau < 1.0, f"--tau must be a fraction in (0, 1); got {self.tau!r}"),
            (isinstance(self.period, int) and self.period >= 2,
             f"the augment/truncate period must be an integer >= 2 steps; got {self.period!r}"),
            (0.0 <= self.momentum < 1.0 and self.weight_decay >= 0.0,
             f"momentum must be in [0, 1) and weight decay >= 0; got {self.momentum!r}, {self.weight_decay!r}"),
            (self.metric in (None, "params", "macs"), f"the rank budget metric must be params, macs or None; "
                                                       f"got {self.metric!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        return self


@dataclass(frozen=True)
class AdaptiveResult:
    """What :func:`adaptive_finetune` did. ``history``/``seconds``/``device``/``amp`` mirror
    :class:`compressor.finetune.FinetuneResult`; ``record`` replaces the tucker record; ``trajectory`` maps each
    layer to its ``[rank_out, rank_in]`` at the start and after each epoch; ``densified`` lists the layers written
    back as dense convs."""

    model: nn.Module
    record: dict[str, Any]
    trajectory: dict[str, list[list[int]]]
    densified: list[str]
    history: list[dict[str, Any]]
    seconds: float
    device: str
    amp: bool = False


def truncation_rank(singular_values: torch.Tensor, tau: float) -> int:
    """Smallest ``r >= 1`` with ``||s[r:]||_2 <= tau * ||s||_2`` (``s`` sorted descending)."""
    s = singular_values.detach().double()
    tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0]))  # tail[r] = ||s[r:]||
    limit = tau * float(tail[0]) if s.numel() else 0.0
    below = (tail <= limit).nonzero()
    return max(1, int(below[0]) if below.numel() else s.numel())


def _mode_product(core: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``core x_mode matrix``: contracts ``core``'s ``mode`` axis (size n) with ``matrix`` of shape (m, n)."""
    return torch.movedim(torch.tensordot(matrix, core, dims=([1], [mode])), 0, mode)


class AdaptiveTucker(nn.Module):
    """Training-time form of a Tucker-2 block: ``conv1x1(U_in^T) -> kxk core -> conv1x1(U_out)`` with orthonormal
    factors (``u_out``, ``u_in`` buffers, gradients only when probed) and a trainable ``core`` and ``bias``."""

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__()
        core_conv: nn.Conv2d = block.core
        if core_conv.padding_mode != "zeros":
            raise InputError(f"--tucker-adaptive supports zero padding only; got {core_conv.padding_mode!r}")
        reduce, restore = getattr(block, "reduce", None), getattr(block, "restore", None)
        last = restore if restore is not None else core_conv
        ref = core_conv.weight.detach().double()
        eye = {n: torch.eye(n, dtype=ref.dtype, device=ref.device) for n in ref.shape[:2]}
        u_in = reduce.weight.detach().double()[:, :, 0, 0].T if reduce is not None else eye[ref.shape[1]]
        u_out = restore.weight.detach().double()[:, :, 0, 0] if restore is not None else eye[ref.shape[0]]
        # Orthonormalise (exact for a fresh factorisation; needed after any training of the 1x1s): U = QR, R -> core.
        q_in, r_in = torch.linalg.qr(u_in)
        q_out, r_out = torch.linalg.qr(u_out)
        core = _mode_product(_mode_product(ref, r_in, 1), r_out, 0)
        self.stride, self.padding, self.dilation = core_conv.stride, core_conv.padding, core_conv.dilation
        self.core = nn.Parameter(core.to(core_conv.weight.dtype))
        self.bias = nn.Parameter(last.bias.detach().clone()) if last.bias is not None else None
        self.register_buffer("u_out", q_out.to(core_conv.weight.dtype))
        self.register_buffer("u_in", q_in.to(core_conv.weight.dtype))
        self.in_hw: tuple[int, int] | None = None

    def ranks(self) -> list[int]:
        return [int(self.u_out.shape[1]), int(self.u_in.shape[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.in_hw = (int(x.shape[-2]), int(x.shape[-1]))
        x = F.conv2d(x, self.u_in.T[:, :, None, None])
        x = F.conv2d(x, self.core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(x, self.u_out[:, :, None, None], self.bias)

    def factor(self, mode: int) -> torch.Tensor:
        return self.u_out if mode == 0 else self.u_in

    def set_factor(self, mode: int, value: torch.Tensor) -> None:
        setattr(self, "u_out" if mode == 0 else "u_in", value.to(self.core.dtype).contiguous())

    def export(self, template: nn.Conv2d) -> tuple[nn.Module, list[int] | None]:
        """The plain module for the final ranks (``tucker_block`` layout), or the dense conv when that is smaller;
        returns it with its record ranks (None for dense)."""
        core, u_out, u_in = self.core.detach(), self.u_out, self.u_in
        (c_out, r_out), (c_in, r_in) = u_out.shape, u_in.shape
        shape = ConvShape.from_conv(template, self.in_hw) if self.in_hw else None
        shrinks = shape is not None and tucker2_shrinks(shape, rank_out=r_out, rank_in=r_in)
        if not shrinks:
            r_out, r_in = c_out, c_in
        if r_in == c_in:
            core, u_in = _mode_product(core, u_in, 1), None
        if r_out == c_out:
            core, u_out = _mode_product(core, u_out, 0), None
        if not shrinks:
            dense = copy.deepcopy(template)
            with torch.no_grad():
                dense.weight.copy_(core)
                if dense.bias is not None:
                    dense.bias.copy_(self.bias)
            return dense, None
        block = tucker_block(template, rank_out=r_out, rank_in=r_in)
        with torch.no_grad():
            if u_in is not None:
                block.reduce.weight.copy_(u_in.T[:, :, None, None])
            block.core.weight.copy_(core)
            if u_out is not None:
                block.restore.weight.copy_(u_out[:, :, None, None])
            last = block.restore if u_out is not None else block.core
            if last.bias is not None:
                last.bias.copy_(self.bias)
        return block, [r_out, r_in]


# --------------------------------------------------------------------------------------------- the two moves
def _swap_core(opt: torch.optim.Optimizer, layer: AdaptiveTucker, new_core: torch.Tensor,
               new_buffer: torch.Tensor | None) -> None:
    """Replace ``layer.core`` by a new Parameter, in the optimiser too, carrying the projected momentum."""
    old = layer.core
    layer.core = nn.Parameter(new_core.to(old.dtype).contiguous())
    for group in opt.param_groups:
        group["params"] = [layer.core if p is old else p for p in group["params"]]
    state = opt.state.pop(old, {})
    if new_buffer is not None and "momentum_buffer" in state:
        opt.state[layer.core] = {**state, "momentum_buffer": new_buffer.to(old.dtype).contiguous()}


def _momentum(opt: torch.optim.Optimizer, layer: AdaptiveTucker) -> torch.Tensor | None:
    buffer = opt.state.get(layer.core, {}).get("momentum_buffer")
    return None if buffer is None else buffer.detach().double()


@torch.no_grad()
def _augment(layer: AdaptiveTucker, opt: torch.optim.Optimizer) -> None:
    core, buffer = layer.core.detach().double(), _momentum(opt, layer)
    for mode in (0, 1):
        u = layer.factor(mode).detach().double()
        c, r = u.shape
        grad = layer.factor(mode).grad
        if r >= c or grad is None:
            continue
        q = torch.linalg.qr(torch.cat([u, grad.double()], dim=1)).Q[:, :min(2 * r, c)]
        q[:, :r] = u  # Q[:, :r] = U diag(+-1) exactly in exact arithmetic; keep U itself (no sign flips)
        q[:, r:] -= u @ (u.T @ q[:, r:])  # re-orthogonalise the new columns against U (float round-off)
        q[:, r:] = torch.linalg.qr(q[:, r:]).Q
        pad = [0] * (2 * core.ndim)
        pad[2 * (core.ndim - 1 - mode) + 1] = q.shape[1] - r  # zero rows for the new directions along `mode`
        core = F.pad(core, pad)
        buffer = F.pad(buffer, pad) if buffer is not None else None
        layer.set_factor(mode, q)
    _swap_core(opt, layer, core, buffer)


def _layer_cost(layer: AdaptiveTucker, template: nn.Conv2d, ranks: tuple[int, int], metric: str) -> int:
    """``metric`` of the module :meth:`AdaptiveTucker.export` writes for ``ranks`` (dense when that is smaller)."""
    shape = ConvShape.from_conv(template, layer.in_hw or (1, 1))
    cost = tucker2_cost(shape, rank_out=ranks[0], rank_in=ranks[1])
    if not tucker2_shrinks(shape, rank_out=ranks[0], rank_in=ranks[1]):
        cost = shape.dense_cost()
    return int(getattr(cost, metric))


def _budget_ranks(spectra: Mapping[str, list[torch.Tensor]], ranks: dict[str, list[int]],
                  cost: Any, budget: int) -> dict[str, list[int]]:
    """Spend exactly the budget, greedily on relative singular values ``s_i / ||s||`` across all layers and modes.

    Over budget: drop the smallest kept value, one rank at a time, until ``sum(cost(name, ranks)) <= budget``.
    Under budget: add back the largest discarded value whose rank still fits, until none fits. So the factorised
    layers keep the cost they started with, and the rank moves to wherever the core's spectrum is heaviest.
    """
    total = sum(cost(name, r) for name, r in ranks.items())

    def rel(name: str, mode: int, index: int) -> float:
        s = spectra[name][mode]
        return float(s[index] / s.norm()) if float(s.norm()) > 0 else 0.0

    while total > budget:
        best = min(((rel(n, m, r[m] - 1), n, m) for n, r in ranks.items() for m in (0, 1) if r[m] > 1), default=None)
        if best is None:
            break
        _, name, mode = best
        before = cost(name, ranks[name])
        ranks[name][mode] -= 1
        total += cost(name, ranks[name]) - before
    full: set[tuple[str, int]] = set()
    while True:
        grow = [(rel(n, m, r[m]), n, m) for n, r in ranks.items() for m in (0, 1)
                if r[m] < len(spectra[n][m]) and (n, m) not in full]
        if not grow:
            return ranks
        _, name, mode = max(grow)
        before = cost(name, ranks[name])
        ranks[name][mode] += 1
        after = cost(name, ranks[name])
        if total - before + after > budget:
            ranks[name][mode] -= 1
            full.add((name, mode))
        else:
            total += after - before


@torch.no_grad()
def _truncate(layers: Mapping[str, tuple[AdaptiveTucker, nn.Conv2d]], opt: torch.optim.Optimizer, cfg: AdaptiveConfig,
              budget: int | None) -> None:
    """Cut every layer to its tau-rank, then (with a budget) move ranks globally until the budget is spent."""
    bases, spectra, ranks = {}, {}, {}
    for name, (layer, _) in layers.items():
        core = layer.core.detach().double()
        svds = [torch.linalg.svd(torch.movedim(core, m, 0).reshape(core.shape[m], -1), full_matrices=False)
                for m in (0, 1)]
        bases[name], spectra[name] = [u for u, _, _ in svds], [s for _, s, _ in svds]
        ranks[name] = [truncation_rank(s, cfg.tau) for s in spectra[name]]
    if budget is not None and cfg.metric is not None:
        metric = cfg.metric
        ranks = _budget_ranks(spectra, ranks, lambda n, r: _layer_cost(*layers[n], tuple(r), metric), budget)
    for name, (layer, _) in layers.items():
        core, buffer = layer.core.detach().double(), _momentum(opt, layer)
        for mode in (0, 1):
            p = bases[name][mode][:, :ranks[name][mode]]
            core = _mode_product(core, p.T, mode)
            buffer = _mode_product(buffer, p.T, mode) if buffer is not None else None
            layer.set_factor(mode, layer.factor(mode).double() @ p)
        _swap_core(opt, layer, core, buffer)


# ---------------------------------------------------------------------------------------------------- the loop
def _wrap(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[AdaptiveTucker, nn.Conv2d]]:
    """Swap each recorded block for an :class:`AdaptiveTucker`; keep a dense conv template for the export."""
    layers = {}
    for name in names:
        block = model.get_submodule(name)
        if not (isinstance(block, nn.Sequential) and hasattr(block, "core")):
            raise CompressorError(f"{name!r} is not a Tucker-2 block of the compressed model; the record is stale")
        core, first, last = block.core, block[0], block[-1]
        template = nn.Conv2d(first.in_channels, last.out_channels, core.kernel_size, stride=core.stride,
                             padding=core.padding, dilation=core.dilation, padding_mode=core.padding_mode,
                             bias=last.bias is not None, device=core.weight.device, dtype=core.weight.dtype)
        layer = AdaptiveTucker(block)
        _set_module(model, name, layer)
        layers[name] = (layer, template)
    return layers


def _run_epoch(model: nn.Module, loader: Any, opt: torch.optim.Optimizer,
               wrapped: Mapping[str, tuple[AdaptiveTucker, nn.Conv2d]], *, cfg: AdaptiveConfig, step: int, total: int,
               device: torch.device, budget: int | None,
               settled: dict[str, list[int]]) -> tuple[int, float, float]:
    """One pass over ``loader``; returns the next global step, the mean loss and the training top-1. ``settled``
    receives each layer's ranks after every truncation (an epoch can end mid-cycle, with the bases augmented)."""
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device), 0
    layers = {name: layer for name, (layer, _) in wrapped.items()}
    model.train()
    for x, y in loader:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, cfg.lr, 0)
        cycle_pos, probe = step % cfg.period, False
        if cycle_pos == 0:  # 1) probe: this step's backward also gives dL/dU for the augmentation
            probe = True
            for layer in layers.values():
                layer.u_out.requires_grad_(True)
                layer.u_in.requires_grad_(True)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if probe:  # augment the bases, then Galerkin steps on the core until the cycle ends
            for layer in layers.values():
                _augment(layer, opt)
                for mode in (0, 1):
                    layer.factor(mode).requires_grad_(False)
                    layer.factor(mode).grad = None
        if cycle_pos == cfg.period - 1 or step == total - 1:  # 3) truncate with tolerance tau
            _truncate(wrapped, opt, cfg, budget)
            settled.update({name: layer.ranks() for name, layer in layers.items()})
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen, step = seen + len(y), step + 1
    return step, float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1)


@torch.no_grad()
def _start_budget(model: nn.Module, wrapped: Mapping[str, tuple[AdaptiveTucker, nn.Conv2d]], loader: Any,
                  metric: str | None, device: torch.device) -> int | None:
    """The factorised layers' total ``metric`` at the start (None without a metric). One eval forward first
    records each layer's input size, which the costs and the final export need."""
    if not wrapped:
        return None
    x, _ = next(iter(loader))
    was_training = model.training
    model.eval()
    model(x[:1].to(device))
    model.train(was_training)
    if metric is None:
        return None
    return sum(_layer_cost(layer, template, tuple(layer.ranks()), metric) for layer, template in wrapped.values())


def _export(model: nn.Module, wrapped: Mapping[str, tuple[AdaptiveTucker, nn.Conv2d]]) -> tuple[dict, list[str]]:
    """Write every layer back as plain convs (in place); the record's layers and the layers turned dense."""
    new_layers, densified = {}, []
    for name, (layer, template) in wrapped.items():
        module, ranks = layer.export(template)
        _set_module(model, name, module)
        if ranks is None:
            densified.append(name)
        else:
            new_layers[name] = ranks
    model.eval()
    return new_layers, densified


def adaptive_finetune(model: nn.Module, loader: Any, *, record: Mapping[str, Any], config: AdaptiveConfig,
                      device: torch.device | str | None = None, eval_loader: Any = None,
                      progress: bool = True) -> AdaptiveResult:
    """Fine-tune a Tucker-factorised model with rank-adaptive BUG steps (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The model :class:`~compressor.methods.tucker.TuckerTransform` produced; not modified (a copy is trained).
    loader : iterable of (x, y) with ``len()``
        Training batches.
    record : mapping
        The tucker transform's record (``{"kind": "tucker", "layers": {name: [rank_out, rank_in]}}``).
    config : AdaptiveConfig
        ``tau``, ``period``, ``lr``, ``epochs``...
    device : optional
        Default: where the model's parameters are.
    eval_loader : optional
        Evaluated after every epoch (``eval_acc`` in the history).
    progress : bool
        One line per epoch on stderr, as :func:`compressor.finetune.finetune`.

    Returns
    -------
    AdaptiveResult
        The trained model in plain-conv form, the record to save in place of ``record``, the rank trajectory.
    """
    cfg = config.validate()
    if not hasattr(loader, "__len__") or len(loader) == 0:
        raise DataError("adaptive fine-tuning needs a non-empty training loader with a length")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model).to(device)
    wrapped = _wrap(model, dict(record.get("layers", {})))
    layers = {name: layer for name, (layer, _) in wrapped.items()}
    trajectory = {name: [layer.ranks()] for name, layer in layers.items()}  # then the settled ranks per epoch
    settled = {name: layer.ranks() for name, layer in layers.items()}
    budget = _start_budget(model, wrapped, loader, cfg.metric, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    bar = _Progress(progress, None, cfg.epochs, len(loader))
    start, step, total = time.perf_counter(), 0, cfg.epochs * len(loader)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        step, loss, train_acc = _run_epoch(model, loader, opt, wrapped, cfg=cfg, step=step, total=total, device=device,
                                           budget=budget, settled=settled)
        if not math.isfinite(loss):
            raise CompressorError(f"adaptive fine-tuning diverged: the loss is {loss} in epoch {epoch}; lower --lr")
        for name in layers:
            trajectory[name].append(list(settled[name]))
        eval_acc = evaluate(model, eval_loader, device=device) if eval_loader is not None else None
        history.append({"epoch": epoch, "loss": loss, "train_acc": train_acc, "eval_acc": eval_acc,
                        "lr": cosine_lr(step - 1, total, cfg.lr, 0), "seconds": time.perf_counter() - t0,
                        "ranks": sum(sum(r) for r in settled.values())})
        bar.epoch(history[-1])
    new_layers, densified = _export(model, wrapped)
    return AdaptiveResult(model=model, record={**record, "layers": new_layers}, trajectory=trajectory,
                          densified=densified, history=history, seconds=time.perf_counter() - start,
                          device=str(device))
