"""CIFAR MobileNetV2.

Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018
(arXiv:1801.04381), table 2: a 3x3 stem conv to 32 channels, seven stages of inverted residual blocks
(1x1 expand, depthwise 3x3, linear 1x1 project), a 1x1 conv to 1280 channels, global average pooling and a linear
classifier. Blocks add their input back when the stride is 1 and the channel count is unchanged; the expansion conv
is omitted when the expansion factor is 1 (as in torchvision's ``mobilenet_v2``).

CIFAR adaptation as in ``pytorch-cifar`` (https://github.com/kuangliu/pytorch-cifar, ``models/mobilenetv2.py``,
MIT): the stem and the second stage use stride 1 instead of 2, so 32x32 inputs end at 4x4 instead of 1x1. ReLU6
follows the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch

__all__ = ["CifarMobileNetV2", "InvertedResidual", "mobilenetv2"]

#: (expansion t, output channels c, blocks n, stride of the first block s); Sandler et al. table 2, CIFAR strides.
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the paper; 1 for 32x32 inputs
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn(in_ch: int, out_ch: int, *, kernel: int, stride: int = 1, groups: int = 1, act: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6())
    return layers


class InvertedResidual(nn.Module):
    """1x1 expand (if ``expansion > 1``), depthwise 3x3, linear 1x1 project, plus identity when shapes match.

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output channels.
    stride : int
        Stride of the depthwise conv.
    expansion : int
        Hidden width is ``in_ch * expansion``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn(in_ch, hidden, kernel=1, act=True)
        layers += _conv_bn(hidden, hidden, kernel=3, stride=stride, groups=hidden, act=True)
        layers += _conv_bn(hidden, out_ch, kernel=1, act=False)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs.

    Parameters
    ----------
    num_classes : int, default 10
        Outputs of ``classifier``.
    """

    def __init__(self, *, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = _conv_bn(3, 32, kernel=3, stride=1, act=True)
        in_ch = 32
        for expansion, out_ch, blocks, stride in _STAGES:
            for i in range(blocks):
                layers.append(InvertedResidual(in_ch, out_ch, stride=stride if i == 0 else 1, expansion=expansion))
                in_ch = out_ch
        layers += _conv_bn(in_ch, 1280, kernel=1, act=True)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As torchvision's mobilenet_v2.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, inverted residual stages and the 1280-channel conv: ``(N, 3, 32, 32) -> (N, 1280, 4, 4)``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and ``classifier``: ``(N, 1280, h, w) -> (N, num_classes)``."""
        return self.classifier(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_arch(
    "mobilenetv2",
    description="CIFAR MobileNetV2 (Sandler et al. 2018; stride-1 stem and stage 2 as in kuangliu/pytorch-cifar)",
)
def mobilenetv2(*, num_classes: int = 10) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes=num_classes)
