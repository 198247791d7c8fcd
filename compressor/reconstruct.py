"""Closed-form reconstruction after channel removal (issue 13, item 1).

Removing a layer's input channels changes what it computes. The classic data-driven compensation (ThiNet, Luo et al.
2017; channel pruning, He et al. 2017, eq. 1 with fixed channel selection) refits the layer's remaining weights so
that, on calibration images, its output matches the **original** layer's output on the kept output channels,
given the **pruned** network's own inputs (so errors made upstream are compensated downstream):

.. math::

    W^\\star = \\arg\\min_W \\; \\lVert Y_o - A_p W \\rVert_F^2 + \\lambda \\lVert W \\rVert_F^2
            = (A_p^\\top A_p + \\lambda I)^{-1} A_p^\\top Y_o ,

where a row of :math:`A_p` is one sampled receptive-field patch (``C_in' * k * k`` values, im2col; plus a 1 for the
bias) of the pruned layer's input and a row of :math:`Y_o` the original layer's pre-BatchNorm output at the same
pixel, on its kept output channels. :math:`\\lambda = \\text{ridge} \\cdot \\operatorname{tr}(A^\\top A) / d`
keeps the solve well-posed with few samples. The BatchNorm that follows keeps its statistics, since the target is
the original pre-BN output.

Layers are refitted in forward order, each with the inputs of the already refitted network. Only ``Conv2d``
(``groups == 1``) and ``Linear`` layers whose input channels were reduced are refitted: a depthwise conv has nothing
to recombine. Which original channels each pruned layer kept comes from the pruning step
(:func:`compressor.pruning.engine.apply_keep` with ``channels=``); a layer that no longer exists under its name (a
Tucker block in a chain) is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ChannelMap", "LayerFit", "patches", "reconstruct", "ridge_fit"]

#: Per layer name, the original indices of the kept channels: ``{"in": [...], "out": [...]}``.
ChannelMap = Mapping[str, Mapping[str, Sequence[int]]]


@dataclass(frozen=True)
class LayerFit:
    """One refitted layer: relative output error ``||Y_o - A W|| / ||Y_o||`` before and after, and its sample."""

    name: str
    error_before: float
    error_after: float
    samples: int

    def row(self) -> dict[str, Any]:
        return {"layer": self.name, "error_before": round(self.error_before, 5),
                "error_after": round(self.error_after, 5), "samples": self.samples}


def ridge_fit(a: torch.Tensor, y: torch.Tensor, *, ridge: float) -> torch.Tensor:
    """Ridge least squares ``W = (A^T A + lam I)^{-1} A^T Y`` with ``lam = ridge * tr(A^T A) / d``, in float64.

    ``a``: ``(n, d)``, ``y``: ``(n, m)``; returns ``(d, m)``. ``ridge = 0`` is plain least squares (``lstsq``).

    >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); w = torch.tensor([[2.0], [-1.0]])
    >>> torch.allclose(ridge_fit(a, a @ w, ridge=0.0), w.double())
    True
    """
    a64, y64 = a.double(), y.double()
    if ridge <= 0:
        return torch.linalg.lstsq(a64, y64).solution
    gram = a64.T @ a64
    lam = ridge * torch.trace(gram) / gram.shape[0]
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, a64.T @ y64)


def patches(x: torch.Tensor, layer: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """Rows of ``A``: the receptive-field patches of ``x`` (the layer's input) at output pixels ``columns``
    (flat indices into ``H_out * W_out``; one row per image and column), ``(N * P, C * k * k)``; for a ``Linear``
    layer the input rows themselves."""
    if isinstance(layer, nn.Linear):  # (N, F), or channels-last (N, H, W, F) sampled at the same pixels as Y
        return x if x.ndim == 2 else x.flatten(1, -2)[:, columns].reshape(-1, x.shape[-1])
    assert isinstance(layer, nn.Conv2d)
    unfolded = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,  # type: ignore[arg-type]
                        stride=layer.stride)  # (N, C*k*k, L)
    return unfolded[:, :, columns].permute(0, 2, 1).reshape(-1, unfolded.shape[1])


def _outputs(y: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Rows of ``Y``: a conv output ``(N, C, H, W)`` at ``columns``, ``(N * P, C)``; a linear output as it is."""
    if y.ndim == 2:
        return y
    flat = y.flatten(2)
    return flat[:, :, columns].permute(0, 2, 1).reshape(-1, flat.shape[1])


class _Stop(Exception):
    """Ends a forward pass once the hooked layer has been seen."""


def _capture(model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor], *, output: bool,
             keep: Callable[[int, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``keep(i, t)`` of the input (or output) ``t`` of ``layer`` on each batch ``i``; each forward ends right after
    the layer (the rest of the network is not run)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append(keep(len(seen), (out if output else args[0]).detach()))
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return seen


def _order(model: nn.Module, example: torch.Tensor, names: Iterable[str]) -> list[str]:
    """``names`` in the order their layers run in a forward pass."""
    wanted, modules, order = set(names), dict(model.named_modules()), []
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n in wanted if n in modules]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def _refittable(original: nn.Module, pruned: nn.Module, name: str) -> bool:
    before, after = dict(original.named_modules()).get(name), dict(pruned.named_modules()).get(name)
    if isinstance(after, nn.Conv2d) and isinstance(before, nn.Conv2d):
        return after.groups == 1 and before.groups == 1 and after.in_channels < before.in_channels
    if isinstance(after, nn.Linear) and isinstance(before, nn.Linear):
        return after.in_features < before.in_features
    return False


def _fit_layer(name: str, layer: nn.Conv2d | nn.Linear, a: torch.Tensor, y: torch.Tensor, ridge: float) -> LayerFit:
    """Solve for ``layer``'s weight (and bias) from ``a`` and ``y`` and write it in place."""
    weight = layer.weight.detach()
    bias = layer.bias
    current = weight.reshape(weight.shape[0], -1).T.double()
    if bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        current = torch.cat([current, bias.detach().double()[None, :]], dim=0)
    a64, y64 = a.double(), y.double()
    norm = torch.linalg.norm(y64).clamp_min(1e-12)
    before = float(torch.linalg.norm(y64 - a64 @ current) / norm)
    solved = ridge_fit(a64, y64, ridge=ridge)
    after = float(torch.linalg.norm(y64 - a64 @ solved) / norm)
    if after >= before:  # never make a layer worse than pruning left it
        return LayerFit(name, before, before, a.shape[0])
    with torch.no_grad():
        w = solved[: current.shape[0] - (bias is not None)].T
        layer.weight.copy_(w.reshape(weight.shape).to(weight.dtype))
        if bias is not None:
            bias.copy_(solved[-1].to(bias.dtype))
    return LayerFit(name, before, after, a.shape[0])


def reconstruct(original: nn.Module, pruned: nn.Module, channels: ChannelMap, batches: Sequence[torch.Tensor], *,
                positions: int = 32, ridge: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Refit, in place and in forward order, every layer of ``pruned`` whose input channels were reduced (see the
    module docstring); ``batches`` are normalised calibration images, ``positions`` output pixels sampled per image
    and layer. Returns the report section: per layer the relative output error before and after, and the seconds."""
    start = time.perf_counter()
    original.eval()
    pruned.eval()
    names = [n for n in channels if _refittable(original, pruned, n)]
    example = batches[0][:1]
    before_modules, after_modules = dict(original.named_modules()), dict(pruned.named_modules())
    fits = []
    generator = torch.Generator().manual_seed(seed)
    for name in _order(pruned, example, names):
        layer, kept_out = after_modules[name], list(channels[name]["out"])
        assert isinstance(layer, (nn.Conv2d, nn.Linear))
        columns: dict[int, torch.Tensor] = {}

        def targets(i: int, y: torch.Tensor, kept_out: list[int] = kept_out, layer: nn.Module = layer
                    ) -> torch.Tensor:
            if isinstance(layer, nn.Linear) and y.ndim > 2:  # channels-last features (ConvNeXt): (N, F, H, W)
                y = y.movedim(-1, 1)
            pixels = y[0, 0].numel() if y.ndim > 2 else 1
            columns[i] = torch.randperm(pixels, generator=generator)[:positions]
            return _outputs(y[:, kept_out], columns[i])

        y = torch.cat(_capture(original, before_modules[name], batches, output=True, keep=targets))
        def inputs(i: int, x: torch.Tensor, layer: nn.Module = layer) -> torch.Tensor:
            return patches(x, layer, columns[i])

        a = torch.cat(_capture(pruned, layer, batches, output=False, keep=inputs))
        fits.append(_fit_layer(name, layer, a, y, ridge))
    return {"layers": [f.row() for f in fits], "refitted": sum(f.error_after < f.error_before for f in fits),
            "positions": positions, "ridge": ridge, "seconds": round(time.perf_counter() - start, 3)}
