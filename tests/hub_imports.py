"""Importing torchvision, timm and onnx2torch in tests, or skipping with a message.

On this project's machines the PyPI torchvision wheel is built for CUDA and fails to import beside a CPU-only torch
(``operator torchvision::nms does not exist``); its classification model code is pure Python and imports once
``torchvision._meta_registrations`` and ``torchvision._autograd_registrations`` are empty modules (see
:mod:`benchmarks.torchvision_models`). timm and onnx2torch import torchvision, so they need the same. Only the tests
and benchmarks use this workaround; the product imports the packages plainly and says what to install when that
fails.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import pytest

from benchmarks.torchvision_models import import_torchvision

INSTALL = {"torchvision": "pip install --no-deps torchvision==0.28.0", "timm": "pip install --no-deps timm",
           "onnx2torch": "pip install --no-deps onnx2torch (or the onnx-input extra)"}


def require(package: str) -> Any:
    """``package`` imported (torchvision first, with the CPU-torch workaround), or skip naming the install command."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"needs torchvision (model code only): {INSTALL['torchvision']}")
    try:
        torchvision = import_torchvision()
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable here
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}: {exc}); {INSTALL['torchvision']}")
    if package == "torchvision":
        return torchvision
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package}: {INSTALL[package]}")
    try:
        return importlib.import_module(package)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{package} does not import here ({type(exc).__name__}: {exc})")
