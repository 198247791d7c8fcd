"""torchvision's ImageNet models for the ``deploy`` suite, as ``--arch`` factories: model code only, no weights.

``compress model.pt --arch benchmarks/torchvision_models.py:resnet18`` builds torchvision's ResNet-18 (also
``mobilenet_v2`` and ``resnet50``); each factory takes ``num_classes`` (1000, as torchvision ships them). Nothing is
downloaded: the benchmark harness saves a seeded random initialisation to a temporary file and compresses that, so
these rows measure latency, never accuracy.

The product does not depend on torchvision; only this benchmark module does. Install it without letting pip touch
torch (the ``bench`` extra pins the same release; pip resolves it against an installed ``torch==2.13.0+cpu``
without pulling another torch)::

    pip install --no-deps torchvision==0.28.0   # the release paired with torch 2.13

On a CPU-only torch the PyPI torchvision wheel (built for CUDA) fails on import with ``operator torchvision::nms
does not exist``: its C++ operators do not load, and ``torchvision._meta_registrations`` /
``torchvision._autograd_registrations`` register Python kernels for them at import time. The model code is pure
Python and needs neither, so :func:`import_torchvision` puts empty modules under those two names in
``sys.modules`` before the first import. Detection ops (``torchvision.ops.nms`` ...) stay unusable; classification
models work.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

from torch import nn

PACKAGE = "torchvision"
INSTALL = "pip install --no-deps torchvision==0.28.0"
_SHIMMED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")

__all__ = ["INSTALL", "available", "import_torchvision", "mobilenet_v2", "resnet18", "resnet50"]


def available() -> bool:
    """Whether torchvision is installed (checked without importing it)."""
    return importlib.util.find_spec(PACKAGE) is not None


def import_torchvision() -> Any:
    """``torchvision``, importable beside a CPU-only torch (see the module docstring); ImportError naming the
    package and its install command when it is absent."""
    if PACKAGE not in sys.modules:
        if not available():
            raise ImportError(f"torchvision is not installed; the deploy suite's 224x224 models need its model "
                              f"code: {INSTALL}")
        for name in _SHIMMED:
            sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision


def _build(name: str, num_classes: int) -> nn.Module:
    model: nn.Module = getattr(import_torchvision().models, name)(weights=None, num_classes=num_classes)
    return model


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 (11.7 M params, 1.8 G MACs at 224x224 with 1000 classes), random weights."""
    return _build("resnet18", num_classes)


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50, random weights."""
    return _build("resnet50", num_classes)


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    """torchvision's MobileNetV2 (width 1.0), random weights."""
    return _build("mobilenet_v2", num_classes)
