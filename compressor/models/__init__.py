"""Built-in architectures and their registry.

Each family file (``resnet_cifar.py``, ``vgg.py``, ``mobilenetv2.py``, ``samplenet.py``) decorates one small
factory per variant with :func:`register_arch`; importing this package imports them all, so every variant is
available by name. The design follows timm's ``register_model`` / ``create_model`` (``timm/models/_registry.py``,
``timm/models/_factory.py``) with two changes: a duplicate name raises instead of warning, and an unknown name raises
:class:`compressor.errors.UnknownNameError` with close matches and the list of known names.
The registry lives in :mod:`compressor.models.registry`; its public names are re-exported here.

Examples
--------
>>> from compressor.models import create_model, get_arch, list_archs
>>> "resnet20" in list_archs()
True
>>> get_arch("resnet20").input_shape
(3, 32, 32)
>>> model = create_model("resnet20", num_classes=100)
"""

from __future__ import annotations

from .registry import ArchSpec as ArchSpec
from .registry import ModelFactory as ModelFactory
from .registry import create_model as create_model
from .registry import get_arch as get_arch
from .registry import list_archs as list_archs
from .registry import register_arch as register_arch
from .registry import reinitialise as reinitialise

# Importing the family files registers their variants with the registry.
from . import mobilenetv2, resnet_cifar, samplenet, vgg  # noqa: F401

__all__ = ["ArchSpec", "create_model", "get_arch", "list_archs", "register_arch", "reinitialise"]
