"""SampleNet: the bundled sample model and the pruning test fixture.

A small CNN (about 23k parameters) for 3x32x32 inputs, designed for this project rather than taken from a paper. It
deliberately contains the three structures that make channel pruning non-trivial, so that one small model exercises
them all:

* a **residual add** (``res``; and ``res2``, whose branch is depthwise-separable): the two addends' channels must be
  pruned together;
* a **channel concat** of two branches (``branch_a`` 1x1 and ``branch_b`` 3x3): pruning the consumer maps channel
  indices back into the right branch;
* a **depthwise conv** (``dw``, ``groups == channels``, fed by the concat; and ``res2.dw``): its input and output
  channels are one and the same.

Layout (spatial size in brackets)::

    stem   conv3x3 3->16, BN, ReLU                                  [32]
    res    conv3x3 16->16, BN, ReLU, conv3x3 16->16, BN; + x; ReLU  [32]
    down   conv3x3/2 16->32, BN, ReLU                               [16]
    cat(branch_a: conv1x1 32->16, BN, ReLU; branch_b: conv3x3 32->16, BN, ReLU) -> 32
    dw     depthwise conv3x3/2 32, BN, ReLU                         [8]
    pw     conv1x1 32->64, BN, ReLU                                 [8]
    res2   depthwise conv3x3 64, BN, ReLU, conv1x1 64->64, BN; + x; ReLU
    pool   global average, then ``classifier`` Linear(64, num_classes)

``samples/make_sample.py`` trains it on a procedurally generated shapes dataset to make ``samples/samplenet.pt``.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch

__all__ = ["SampleNet", "samplenet"]


def _conv_bn_relu(in_ch: int, out_ch: int, *, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class _Residual(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))`` with shape-preserving convs.

    ``depthwise=True`` makes ``conv1`` a depthwise 3x3 and ``conv2`` a pointwise 1x1.
    """

    def __init__(self, channels: int, *, depthwise: bool = False) -> None:
        super().__init__()
        groups, kernel2 = (channels, 1) if depthwise else (1, 3)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, kernel2, padding=kernel2 // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(x + out)


class SampleNet(nn.Module):
    """Small CNN with a residual add, a two-branch concat and depthwise convs (see the module docstring).

    Parameters
    ----------
    num_classes : int, default 10
        Outputs of ``classifier``.
    width : int, default 1
        Multiplies every channel count (``samplenet_wide`` is width 3).
    """

    def __init__(self, *, num_classes: int = 10, width: int = 1) -> None:
        super().__init__()
        c = 16 * width
        self.stem = _conv_bn_relu(3, c)
        self.res = _Residual(c)
        self.down = _conv_bn_relu(c, 2 * c, stride=2)
        self.branch_a = _conv_bn_relu(2 * c, c, kernel=1)
        self.branch_b = _conv_bn_relu(2 * c, c, kernel=3)
        self.dw = _conv_bn_relu(2 * c, 2 * c, stride=2, groups=2 * c)
        self.pw = _conv_bn_relu(2 * c, 4 * c, kernel=1)
        self.res2 = _Residual(4 * c, depthwise=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * c, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 32, 32) -> (N, 64 * width, 8, 8)``."""
        x = self.down(self.res(self.stem(x)))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.res2(self.pw(self.dw(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and ``classifier``: ``(N, 64, h, w) -> (N, num_classes)``."""
        return self.classifier(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_arch(
    "samplenet",
    description="bundled sample CNN (~23k params) with a residual add, a concat and depthwise convs",
)
def samplenet(*, num_classes: int = 10) -> SampleNet:
    return SampleNet(num_classes=num_classes)


@register_arch(
    "samplenet_wide",
    description="samplenet at 3x the channels (~0.19M params): the README sample, wide enough for pruning to pay",
)
def samplenet_wide(*, num_classes: int = 10) -> SampleNet:
    return SampleNet(num_classes=num_classes, width=3)
