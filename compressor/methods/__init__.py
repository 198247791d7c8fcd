"""Every compression method, registered explicitly in one place: :data:`REGISTRY`.

``--help``, ``compress methods``, the API and the conformance tests all read this registry, so every method is
visible whatever was imported first. A new method is one module with one :class:`~compressor.methods.base.Method`
subclass, added to the tuple below. ``a+b`` builds a :class:`~compressor.methods.chain.Chain`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._registry import Registry
from ..options import parse_options, split_prefixed
from .base import Method, replay  # noqa: F401 - replay is public here: every method's records are registered
from .baselines import L1, Random
from .blocks import Blocks
from .chain import Chain
from .cmi import CMI
from .imp import IMP
from .mipp import MIPP
from .tp_peers import PEERS
from .tucker import Tucker

REGISTRY: Registry[type[Method]] = Registry("method")
for _cls in (L1, Random, CMI, MIPP, Tucker, Blocks, IMP, *PEERS):
    REGISTRY.add(_cls.name, _cls)


def list_methods() -> list[str]:
    """Registered method names (chains are any of them joined with ``+``)."""
    return REGISTRY.names()


def get_method(name: str) -> type[Method]:
    """The class registered as ``name``; unknown names raise a one-line error with close matches."""
    return REGISTRY.get(name)


def build_method(spec: str, options: Mapping[str, Any] | None = None) -> Method:
    """The method ``spec`` (``l1``, ``cmi+tucker``...) with ``options`` keyed ``<method>_<option>``.

    >>> build_method("tucker", {"tucker_tau": 0.2}).options.tau  # doctest: +SKIP
    0.2
    """
    names = spec.split("+")
    classes = [get_method(n) for n in names]
    prefixes = names + (["chain"] if len(names) > 1 else [])
    values = split_prefixed({k: v for k, v in (options or {}).items() if v is not None}, prefixes)
    steps = [cls.from_values(values[cls.name]) for cls in classes]
    if len(steps) == 1:
        return steps[0]
    return Chain(steps, parse_options(Chain.Options, Chain.name, values["chain"]))
