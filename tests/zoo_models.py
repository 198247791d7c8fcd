"""Small reproductions of the structures of common CNNs that torchvision/timm models are built from (issue 17), so
the coverage tests (``tests/test_coverage.py``) run without torchvision. Each factory takes ``num_classes``.

* :func:`resnext_block`: grouped (not depthwise) 3x3 convolutions in a bottleneck with a residual (ResNeXt, RegNet);
* :func:`shuffle_unit`: channel split, concat and channel shuffle (ShuffleNetV2);
* :func:`convnext_block`: depthwise 7x7 conv, channels-last LayerNorm, pointwise Linear layers, layer scale
  (ConvNeXt), and a channels-first LayerNorm2d in the downsampling layer;
* :func:`se_silu`: SiLU activations and a sigmoid-gated squeeze-excitation block (EfficientNet, MobileNetV3);
* :func:`lenet_gray`: a grayscale LeNet that flattens with ``x.view(-1, 4*4*50)`` (28x28 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Bottleneck(nn.Module):
    def __init__(self, channels: int, width: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(x + self.bn3(self.conv3(out)))


class ResNeXtNet(nn.Module):
    """Stem, two bottlenecks whose 3x3 convs have 4 groups (8 channels each), a grouped stride-2 conv, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block1 = _Bottleneck(32, 32, groups=4)
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=4, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        self.block2 = _Bottleneck(64, 32, groups=4)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle, written as torchvision writes it (view, transpose, view)."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class _ShuffleUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((a, self.branch(b)), dim=1), 2)


class ShuffleNet(nn.Module):
    """Stem, two ShuffleNetV2 stride-1 units (split, branch, concat, shuffle), a 1x1 conv, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(_ShuffleUnit(16), _ShuffleUnit(16))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.units(self.stem(x)))
        return self.fc(x.mean([2, 3]))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (torchvision's ConvNeXt): permute, normalise, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class _CNBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]), nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXtNet(nn.Module):
    """Patchify stem with LayerNorm2d, a ConvNeXt block, LayerNorm2d + stride-2 conv, a block, LayerNorm head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16, eps=1e-6))
        self.stage1 = _CNBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, stride=2))
        self.stage2 = _CNBlock(32)
        self.norm = LayerNorm2d(32, eps=1e-6)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.norm(x), 1), 1))


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class SENet(nn.Module):
    """MBConv-like: stem (SiLU), expand 1x1, depthwise 3x3, squeeze-excitation, project 1x1, a second conv, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48),
                                nn.SiLU())
        self.se = _SqueezeExcitation(48, 8)
        self.project = nn.Sequential(nn.Conv2d(48, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.project(self.se(self.dw(self.expand(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LeNetGray(nn.Module):
    """The classic MNIST LeNet: 28x28x1 input, two 5x5 convs, flatten with a hard-coded ``view(-1, 4*4*50)``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = x.view(-1, 4 * 4 * 50)
        return self.fc2(F.relu(self.fc1(x)))


def resnext_block(num_classes: int = 10) -> nn.Module:
    """:class:`ResNeXtNet` (3x32x32 inputs)."""
    return ResNeXtNet(num_classes)


def shuffle_unit(num_classes: int = 10) -> nn.Module:
    """:class:`ShuffleNet` (3x32x32 inputs)."""
    return ShuffleNet(num_classes)


def convnext_block(num_classes: int = 10) -> nn.Module:
    """:class:`ConvNeXtNet` (3x32x32 inputs)."""
    return ConvNeXtNet(num_classes)


def se_silu(num_classes: int = 10) -> nn.Module:
    """:class:`SENet` (3x32x32 inputs)."""
    return SENet(num_classes)


def lenet_gray(num_classes: int = 10) -> nn.Module:
    """:class:`LeNetGray` (1x28x28 inputs)."""
    return LeNetGray(num_classes)
