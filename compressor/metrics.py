"""Model size and cost counters.

MAC convention (stated in every report): one multiply-accumulate per weight per output position, counted for
``Conv2d`` (``H_out * W_out * C_out * C_in / groups * k_h * k_w``) and ``Linear`` (``in * out``) layers, for ONE
image; BatchNorm, activations, pooling, additions and bias additions are not counted. This is the convention of
He et al. (2015) and of most pruning papers (ResNet-56 on CIFAR-10: about 125.5 M).
"""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_filters(model: nn.Module) -> int:
    """Total output channels of all ``Conv2d`` layers (the ``filters`` target metric)."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per ``Conv2d``/``Linear`` layer for one image, measured with forward hooks on a batch of one."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_position = module.out_channels * (module.in_channels // module.groups) * kh * kw
                macs[name] = macs.get(name, 0) + per_position * output.shape[-1] * output.shape[-2]
            elif isinstance(module, nn.Linear):
                macs[name] = macs.get(name, 0) + module.in_features * module.out_features * (
                    output.numel() // output.shape[0] // module.out_features)
        return record

    try:
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                handles.append(module.register_forward_hook(hook(name)))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return macs


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Total MACs for one image (see the module docstring for the convention)."""
    return sum(layer_macs(model, example_input).values())
