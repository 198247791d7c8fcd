"""Module surgery shared by ``tucker`` and its rank-adaptive training: the Tucker-2 block layout, and replacing a
submodule by its dotted name."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

__all__ = ["set_module", "tucker_block"]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``model``'s submodule ``name`` (dotted, as in ``named_modules``) by ``module``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def tucker_block(conv: nn.Conv2d, *, rank_out: int, rank_in: int) -> nn.Sequential:
    """The module layout :func:`~compressor.factorize.factorize_conv` builds, with freshly initialised weights.

    ``reduce`` (1x1 ``C_in -> rank_in``, only when ``rank_in < C_in``), ``core`` (kxk ``rank_in -> rank_out``
    with ``conv``'s stride, padding, dilation and padding mode; the bias when it is last) and ``restore``
    (1x1 ``rank_out -> C_out`` with the bias, only when ``rank_out < C_out``). Used to replay a record: the
    weights are loaded afterwards.
    """
    if not (1 <= rank_out <= conv.out_channels and 1 <= rank_in <= conv.in_channels):
        raise ValueError(f"ranks ({rank_out}, {rank_in}) outside [1, {conv.out_channels}] x [1, {conv.in_channels}]")
    bias = conv.bias is not None
    keep_in, keep_out = rank_in < conv.in_channels, rank_out < conv.out_channels
    factory: dict[str, Any] = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    spatial: dict[str, Any] = {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
                               "dilation": conv.dilation, "padding_mode": conv.padding_mode}
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if keep_in:
        layers["reduce"] = nn.Conv2d(conv.in_channels, rank_in, 1, bias=False, **factory)
    layers["core"] = nn.Conv2d(rank_in, rank_out, bias=bias and not keep_out, **spatial, **factory)
    if keep_out:
        layers["restore"] = nn.Conv2d(rank_out, conv.out_channels, 1, bias=bias, **factory)
    block = nn.Sequential(layers)
    block.requires_grad_(conv.weight.requires_grad)
    return block.train(conv.training)
