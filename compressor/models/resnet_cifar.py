"""CIFAR ResNets (ResNet-20/32/44/56/110).

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385), section 4.2:
a 3x3 conv 3->16, then three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (depth ``6n + 2``), the first
block of stages 2 and 3 with stride 2, global average pooling and a linear classifier. The shortcut is the
parameter-free "option A" (subsample, then zero channels).

This is a re-implementation of Yerlan Idelbayev's ``pytorch_resnet_cifar10``
(https://github.com/akamaster/pytorch_resnet_cifar10, ``resnet.py``, BSD-2-Clause, (c) 2018 Yerlan Idelbayev) with
the same parameter names (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, ``linear``) and the same
Kaiming-normal initialisation, so its released checkpoints load strictly once the ``DataParallel`` prefix
``module.`` is stripped. Their old format lacks the BatchNorm ``num_batches_tracked`` buffers; the loader fills
those in. Two deliberate differences, neither visible in a state_dict: the option-A lambda is the explicit
:class:`~compressor.models.layers.ChannelShortcut` (so pruning can follow it), and the ReLUs are modules (so
activation hooks can see them).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch
from compressor.models.layers import ChannelShortcut

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal init of conv and linear weights, as ``_weights_init`` in pytorch_resnet_cifar10."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int, default 1
        Stride of the first conv (and of the shortcut when the shape changes).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            # Option A: x[:, :, ::2, ::2] zero-padded with planes // 4 channels on each side.
            self.shortcut = ChannelShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth ``6n + 2`` for 32x32 inputs.

    Parameters
    ----------
    num_blocks : int
        Blocks per stage, ``n``.
    num_classes : int, default 10
        Outputs of ``linear``.
    """

    def __init__(self, num_blocks: int, *, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(16, 16, num_blocks, stride=1)
        self.layer2 = self._make_stage(16, 32, num_blocks, stride=2)
        self.layer3 = self._make_stage(32, 64, num_blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        self.apply(_init_weights)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, *, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the three stages: ``(N, 3, H, W) -> (N, 64, H/4, W/4)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and ``linear``: ``(N, 64, h, w) -> (N, num_classes)``."""
        return self.linear(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(depth: int, num_classes: int) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes)


_DESC = "CIFAR ResNet-{} (He et al. 2015; akamaster/pytorch_resnet_cifar10 layout, option-A shortcut)"


@register_arch("resnet20", description=_DESC.format(20))
def resnet20(*, num_classes: int = 10) -> CifarResNet:
    return _create(20, num_classes)


@register_arch("resnet32", description=_DESC.format(32))
def resnet32(*, num_classes: int = 10) -> CifarResNet:
    return _create(32, num_classes)


@register_arch("resnet44", description=_DESC.format(44))
def resnet44(*, num_classes: int = 10) -> CifarResNet:
    return _create(44, num_classes)


@register_arch("resnet56", description=_DESC.format(56))
def resnet56(*, num_classes: int = 10) -> CifarResNet:
    return _create(56, num_classes)


@register_arch("resnet110", description=_DESC.format(110))
def resnet110(*, num_classes: int = 10) -> CifarResNet:
    return _create(110, num_classes)
