"""Rank-adaptive training of Tucker-2 factorised convolutions (``--tucker-adaptive``, tolerance ``--tucker-tau``,
cycle ``--tucker-period``), as a :class:`~compressor.training.Callback` of the one Trainer.

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
shrink where the core's spectrum decays below the tolerance. The optimiser's state for the core moves along in both
steps: linear statistics (SGD's momentum buffer, Adam's first moment) are zero-padded, then cut by the same
:math:`P`; Adam's second moment is cut by :math:`P \\circ P` so it stays non-negative. Departures from the paper, for
simplicity: augmentation and truncation happen every ``period`` steps instead of every step, and the factor gradient
is the one of a single batch (of whatever loss the Trainer uses: cross-entropy or distillation; under AMP it is the
scaled gradient, whose span is the same, and a step with non-finite gradients skips the augmentation).

One addition for ``--tucker-rank-rule target``: with a ``metric``, each truncation also keeps the factorised layers'
total params (or MACs) at its starting value, dropping the smallest and restoring the largest relative singular
values across all layers (:func:`budget_ranks`); ``tau`` alone would shrink the model below the requested budget
(ResNet-56 at ``--target 0.33`` and ``tau = 0.1``: 40.5% of the parameters removed after the first truncation) or let
it grow past it.

At the end each factorised layer is written back as the plain ``nn.Sequential`` of
:func:`~compressor.methods.tucker_modules.tucker_block` with the final ranks (a 1x1 at full rank folded into the
core); a layer whose final ranks no longer lower both its params and MACs is written back as the dense conv it
represents and leaves the record. :meth:`AdaptiveTucker.records` gives the record to save, so that
``load_compressed`` replays exactly what was trained.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressorError, InputError
from ..factorize import ConvShape, tucker2_cost, tucker2_shrinks
from ..training import Callback, TrainState
from .tucker_modules import set_module, tucker_block

__all__ = ["AdaptiveTucker", "AdaptiveTuckerConv", "augment", "budget_ranks", "truncate", "truncation_rank"]


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


class AdaptiveTuckerConv(nn.Module):
    """Training-time form of a Tucker-2 block: ``conv1x1(U_in^T) -> kxk core -> conv1x1(U_out)`` with orthonormal
    factors (``u_out``, ``u_in`` buffers, gradients only while probed) and a trainable ``core`` and ``bias``.
    ``in_hw`` is the spatial size of the layer's input (for its costs and the export)."""

    u_out: torch.Tensor
    u_in: torch.Tensor

    def __init__(self, block: nn.Sequential, in_hw: tuple[int, int]) -> None:
        super().__init__()
        core_conv = _part(block, "core")
        assert core_conv is not None  # every Tucker-2 block has a core
        if core_conv.padding_mode != "zeros":
            raise InputError(f"--tucker-adaptive supports zero padding only; got {core_conv.padding_mode!r}")
        reduce, restore = _part(block, "reduce"), _part(block, "restore")
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
        self.in_hw = (int(in_hw[0]), int(in_hw[1]))

    def ranks(self) -> list[int]:
        return [int(self.u_out.shape[1]), int(self.u_in.shape[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.u_in.T[:, :, None, None])
        x = F.conv2d(x, self.core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(x, self.u_out[:, :, None, None], self.bias)

    def factor(self, mode: int) -> torch.Tensor:
        return self.u_out if mode == 0 else self.u_in

    def set_factor(self, mode: int, value: torch.Tensor) -> None:
        setattr(self, "u_out" if mode == 0 else "u_in", value.to(self.core.dtype).contiguous())

    def probe(self, on: bool) -> None:
        """Let the next backward pass compute the factors' gradients (``on``), or stop and drop them."""
        for mode in (0, 1):
            self.factor(mode).requires_grad_(on)
            if not on:
                self.factor(mode).grad = None

    def export(self, template: nn.Conv2d) -> tuple[nn.Module, list[int] | None]:
        """The plain module for the final ranks (``tucker_block`` layout), or the dense conv when that is smaller;
        returns it with its record ranks (None for dense)."""
        core = self.core.detach()
        (c_out, r_out), (c_in, r_in) = self.u_out.shape, self.u_in.shape
        shrinks = tucker2_shrinks(ConvShape.from_conv(template, self.in_hw), rank_out=r_out, rank_in=r_in)
        if not shrinks:
            r_out, r_in = c_out, c_in
        u_out: torch.Tensor | None = self.u_out
        u_in: torch.Tensor | None = self.u_in
        if r_in == c_in:
            core, u_in = _mode_product(core, self.u_in, 1), None
        if r_out == c_out:
            core, u_out = _mode_product(core, self.u_out, 0), None
        if not shrinks:
            dense = copy.deepcopy(template)
            with torch.no_grad():
                dense.weight.copy_(core)
                if dense.bias is not None and self.bias is not None:
                    dense.bias.copy_(self.bias)
            return dense, None
        block = tucker_block(template, rank_out=r_out, rank_in=r_in)
        reduce, block_core, restore = _part(block, "reduce"), _part(block, "core"), _part(block, "restore")
        assert block_core is not None
        with torch.no_grad():
            if reduce is not None and u_in is not None:
                reduce.weight.copy_(u_in.T[:, :, None, None])
            block_core.weight.copy_(core)
            if restore is not None and u_out is not None:
                restore.weight.copy_(u_out[:, :, None, None])
            last = restore if restore is not None else block_core
            if last.bias is not None and self.bias is not None:
                last.bias.copy_(self.bias)
        return block, [r_out, r_in]


def _part(block: nn.Module, name: str) -> nn.Conv2d | None:
    """The ``reduce``, ``core`` or ``restore`` conv of a Tucker-2 block (None when absent)."""
    return cast("nn.Conv2d | None", getattr(block, name, None))


Layers = Mapping[str, tuple[AdaptiveTuckerConv, nn.Conv2d]]  # name -> (training-time layer, dense conv template)


# --------------------------------------------------------------------------------------------- the two moves
def _replace_core(opt: torch.optim.Optimizer, layer: AdaptiveTuckerConv,
                  move: Callable[[torch.Tensor, bool], torch.Tensor]) -> None:
    """Replace ``layer.core`` by ``move(core, False)`` as a new Parameter, in ``opt`` too, carrying the optimiser's
    state of the core along: ``move(t, True)`` for Adam's second moment (``exp_avg_sq``), ``move(t, False)`` for
    every other state tensor of the core's shape (momentum buffer, first moment); scalars (Adam's step) stay."""
    old = layer.core
    layer.core = nn.Parameter(move(old.detach().double(), False).to(old.dtype).contiguous())
    for group in opt.param_groups:
        group["params"] = [layer.core if p is old else p for p in group["params"]]
    state = opt.state.pop(old, {})
    if state:
        opt.state[layer.core] = {
            key: move(value.detach().double(), key == "exp_avg_sq").to(value.dtype).contiguous()
            if torch.is_tensor(value) and value.shape == old.shape else value
            for key, value in state.items()}


@torch.no_grad()
def augment(layer: AdaptiveTuckerConv, opt: torch.optim.Optimizer) -> None:
    """Step 1 (module docstring): extend each factor by its gradient's directions, pad the core (and its optimiser
    state) with zeros; the layer's function is unchanged. A mode at full rank, without a gradient, or with a
    non-finite one (a step the AMP scaler skipped) is left as it is."""
    pads = []
    for mode in (0, 1):
        u = layer.factor(mode).detach().double()
        c, r = u.shape
        grad = layer.factor(mode).grad
        if r >= c or grad is None or not torch.isfinite(grad).all():
            continue
        q = torch.linalg.qr(torch.cat([u, grad.double()], dim=1)).Q[:, :min(2 * r, c)]
        q[:, :r] = u  # Q[:, :r] = U diag(+-1) exactly in exact arithmetic; keep U itself (no sign flips)
        q[:, r:] -= u @ (u.T @ q[:, r:])  # re-orthogonalise the new columns against U (float round-off)
        q[:, r:] = torch.linalg.qr(q[:, r:]).Q
        pad = [0] * (2 * layer.core.ndim)
        pad[2 * (layer.core.ndim - 1 - mode) + 1] = q.shape[1] - r  # zero rows for the new directions along `mode`
        pads.append(pad)
        layer.set_factor(mode, q)
    if pads:
        def move(t: torch.Tensor, squared: bool) -> torch.Tensor:
            for pad in pads:
                t = F.pad(t, pad)
            return t

        _replace_core(opt, layer, move)


def _layer_cost(layer: AdaptiveTuckerConv, template: nn.Conv2d, ranks: tuple[int, int], metric: str) -> int:
    """``metric`` of the module :meth:`AdaptiveTuckerConv.export` writes for ``ranks`` (dense when that is smaller)."""
    shape = ConvShape.from_conv(template, layer.in_hw)
    cost = tucker2_cost(shape, rank_out=ranks[0], rank_in=ranks[1])
    if not tucker2_shrinks(shape, rank_out=ranks[0], rank_in=ranks[1]):
        cost = shape.dense_cost()
    return int(getattr(cost, metric))


def budget_ranks(spectra: Mapping[str, list[torch.Tensor]], ranks: dict[str, list[int]],
                 cost: Callable[[str, list[int]], int], budget: int) -> dict[str, list[int]]:
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
def truncate(layers: Layers, opt: torch.optim.Optimizer, *, tau: float, metric: str | None = None,
             budget: int | None = None) -> None:
    """Step 3 (module docstring): cut every layer to its ``tau``-rank, then (with ``metric`` and ``budget``) move
    ranks across layers and modes until the budget is spent (:func:`budget_ranks`)."""
    bases, spectra, ranks = {}, {}, {}
    for name, (layer, _) in layers.items():
        core = layer.core.detach().double()
        svds = [torch.linalg.svd(torch.movedim(core, m, 0).reshape(core.shape[m], -1), full_matrices=False)
                for m in (0, 1)]
        bases[name], spectra[name] = [u for u, _, _ in svds], [s for _, s, _ in svds]
        ranks[name] = [truncation_rank(s, tau) for s in spectra[name]]
    if budget is not None and metric is not None:
        chosen = metric
        ranks = budget_ranks(spectra, ranks, lambda n, r: _layer_cost(*layers[n], (r[0], r[1]), chosen), budget)
    for name, (layer, _) in layers.items():
        cuts = [bases[name][mode][:, :ranks[name][mode]] for mode in (0, 1)]

        def move(t: torch.Tensor, squared: bool, cuts: list[torch.Tensor] = cuts) -> torch.Tensor:
            for mode, p in enumerate(cuts):
                t = _mode_product(t, p.T**2 if squared else p.T, mode)
            return t

        for mode, p in enumerate(cuts):
            layer.set_factor(mode, layer.factor(mode).double() @ p)
        _replace_core(opt, layer, move)


# ------------------------------------------------------------------------------------------------ the callback
class AdaptiveTucker(Callback):
    """The Trainer callback of ``--tucker-adaptive`` (see the module docstring).

    Parameters
    ----------
    record : mapping
        The tucker record of :meth:`compressor.methods.tucker.Tucker.apply` (``{"kind": "tucker", "layers":
        {name: [rank_out, rank_in]}}``): the layers of the trained model to wrap.
    input_sizes : mapping
        Spatial size ``(h, w)`` of each layer's input (the costs and the export need them).
    tau, period : float, int
        Truncation tolerance in (0, 1) and steps per augment/truncate cycle (>= 2); validated by ``TuckerOptions``.
    metric : str or None
        ``params`` or ``macs``: hold the factorised layers' total of it at its starting value; None lets ``tau``
        alone decide (the model may shrink or grow).

    After training, :meth:`records` and :meth:`report` replace the method's record and extend its report section.
    """

    def __init__(self, record: Mapping[str, Any], *, input_sizes: Mapping[str, tuple[int, int]], tau: float,
                 period: int, metric: str | None) -> None:
        self.record = {**record, "layers": {str(n): [int(r) for r in rs] for n, rs in record["layers"].items()}}
        self.input_sizes, self.tau, self.period, self.metric = dict(input_sizes), tau, period, metric
        self.layers: dict[str, tuple[AdaptiveTuckerConv, nn.Conv2d]] = {}
        self.budget: int | None = None
        self.settled = {name: list(ranks) for name, ranks in self.record["layers"].items()}
        self.trajectory = {name: [list(ranks)] for name, ranks in self.settled.items()}
        self.final: dict[str, list[int]] = dict(self.settled)
        self.densified: list[str] = []

    def on_train_start(self, state: TrainState) -> None:
        self.layers = _wrap(state.model, self.record["layers"], self.input_sizes)
        if self.metric is not None and self.layers:
            self.budget = sum(_layer_cost(layer, template, (layer.ranks()[0], layer.ranks()[1]), self.metric)
                              for layer, template in self.layers.values())

    def on_step_start(self, state: TrainState) -> None:
        if state.step % self.period == 0:  # probe: this step's backward also gives dL/dU for the augmentation
            for layer, _ in self.layers.values():
                layer.probe(True)

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.period == 0:  # augment the bases; Galerkin steps on the core until the cycle ends
            for layer, _ in self.layers.values():
                augment(layer, state.optimizer)
                layer.probe(False)
        if state.step % self.period == self.period - 1 or state.step == state.total_steps - 1:
            truncate(self.layers, state.optimizer, tau=self.tau, metric=self.metric, budget=self.budget)
            self.settled = {name: layer.ranks() for name, (layer, _) in self.layers.items()}

    def on_epoch_end(self, state: TrainState) -> None:
        """The ranks after the last truncation (an epoch can end mid-cycle, with the bases augmented)."""
        for name in self.layers:
            self.trajectory[name].append(list(self.settled[name]))
        state.history[-1]["ranks"] = sum(sum(r) for r in self.settled.values())

    def on_train_end(self, state: TrainState) -> None:
        self.final, self.densified = {}, []
        for name, (layer, template) in self.layers.items():
            module, ranks = layer.export(template)
            set_module(state.model, name, module)
            if ranks is None:
                self.densified.append(name)
            else:
                self.final[name] = ranks
        self.layers = {}

    def records(self) -> list[dict[str, Any]]:
        """The tucker record with the trained ranks (the method's record before training)."""
        return [{**self.record, "layers": {name: list(ranks) for name, ranks in self.final.items()}}]

    def report(self) -> dict[str, Any]:
        """For the method's report section: ``final_ranks``, the ``trajectory`` of each layer's ``[rank_out,
        rank_in]`` (at the start, then after each epoch) and the layers ``densified`` (written back dense)."""
        return {"tucker": {"final_ranks": {name: list(ranks) for name, ranks in self.final.items()},
                           "trajectory": {name: [list(r) for r in t] for name, t in self.trajectory.items()},
                           "densified": list(self.densified)}}


def _wrap(model: nn.Module, names: Mapping[str, Any],
          input_sizes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[AdaptiveTuckerConv, nn.Conv2d]]:
    """Swap each recorded block for an :class:`AdaptiveTuckerConv` (in place); keep a dense conv template, in the
    block's train/eval mode, for the export."""
    layers = {}
    for name in names:
        block = model.get_submodule(name)
        core = _part(block, "core")
        if not isinstance(block, nn.Sequential) or core is None:
            raise CompressorError(f"{name!r} is not a Tucker-2 block of the compressed model; the record is stale")
        first, last = cast(nn.Conv2d, block[0]), cast(nn.Conv2d, block[-1])
        spatial: dict[str, Any] = {"kernel_size": core.kernel_size, "stride": core.stride, "padding": core.padding,
                                   "dilation": core.dilation, "padding_mode": core.padding_mode}
        template = nn.Conv2d(first.in_channels, last.out_channels, bias=last.bias is not None, **spatial,
                             device=core.weight.device, dtype=core.weight.dtype)
        layer = AdaptiveTuckerConv(block, input_sizes[name])
        set_module(model, name, layer)
        layers[name] = (layer, template.train(block.training))
    return layers
