"""CIFAR VGG with batch normalisation (VGG-11-BN, VGG-16-BN).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015
(arXiv:1409.1556), configurations A (11 layers) and D (16 layers), with BatchNorm after every conv (Ioffe and
Szegedy 2015, arXiv:1502.03167). The CIFAR adaptation follows the common ``pytorch-cifar`` layout
(https://github.com/kuangliu/pytorch-cifar, ``models/vgg.py``, MIT): 3x3 convs with padding 1, five 2x2 max-pools
take 32x32 down to 1x1, and the three fully connected layers are replaced by one ``Linear(512, num_classes)``.
Parameter names (``features.{i}``, ``classifier``) and the conv biases match that repository, so its checkpoints
load strictly; the biases are redundant before BatchNorm but kept for that compatibility.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch

__all__ = ["CifarVGG", "vgg11_bn", "vgg16_bn"]

#: Channel counts of the 3x3 convs, "M" for a 2x2 max-pool (Simonyan and Zisserman 2015, table 1).
_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _make_features(config: list[int | str]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_channels = int(item)
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG body for 32x32 inputs, flattened 512 features, one linear classifier.

    Parameters
    ----------
    config : list of int or "M"
        Conv channel counts and max-pool markers; the input must reach 1x1 with 512 channels.
    num_classes : int, default 10
        Outputs of ``classifier``.
    """

    def __init__(self, config: list[int | str], *, num_classes: int = 10) -> None:
        super().__init__()
        self.features = _make_features(config)
        self.classifier = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv/BN/ReLU/max-pool stack: ``(N, 3, 32, 32) -> (N, 512, 1, 1)``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten and classify: ``(N, 512, 1, 1) -> (N, num_classes)``."""
        return self.classifier(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_DESC = "CIFAR VGG-{}-BN (Simonyan & Zisserman 2015, config {}; pytorch-cifar layout, Linear(512, classes) head)"


@register_arch("vgg11_bn", description=_DESC.format(11, "A"))
def vgg11_bn(*, num_classes: int = 10) -> CifarVGG:
    return CifarVGG(_CONFIGS["vgg11"], num_classes=num_classes)


@register_arch("vgg16_bn", description=_DESC.format(16, "D"))
def vgg16_bn(*, num_classes: int = 10) -> CifarVGG:
    return CifarVGG(_CONFIGS["vgg16"], num_classes=num_classes)
