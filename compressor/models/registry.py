"""The architecture registry: :func:`register_arch` records a factory under a name, :func:`create_model` builds it.

The family files (``resnet_cifar.py``, ``vgg.py``, ``mobilenetv2.py``, ``samplenet.py``) import
:func:`register_arch` from here; :mod:`compressor.models` imports them all and re-exports this module's public names,
so ``from compressor.models import create_model`` sees every built-in variant. See :mod:`compressor.models` for the
design (timm's ``register_model`` / ``create_model``) and examples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import InputError, UnknownNameError

__all__ = ["ArchSpec", "create_model", "get_arch", "list_archs", "register_arch", "reinitialise"]

#: A factory builds a freshly initialised model; it takes ``num_classes`` as a keyword.
ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    """What the registry knows about one architecture.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"resnet20"``.
    factory : callable
        ``factory(*, num_classes: int) -> nn.Module``; returns a freshly initialised model.
    input_shape : tuple of int
        Expected input ``(C, H, W)`` without the batch dimension.
    num_classes : int
        Default number of classes (outputs of the classifier).
    description : str
        One line for listings, with the provenance.
    """

    name: str
    factory: ModelFactory
    input_shape: tuple[int, ...]
    num_classes: int
    description: str


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(
    name: str,
    *,
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    description: str = "",
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers a model factory under ``name``.

    Parameters
    ----------
    name : str
        Unique registry key.
    input_shape : tuple of int, default (3, 32, 32)
        Expected input ``(C, H, W)``.
    num_classes : int, default 10
        Default number of classes.
    description : str, default ""
        One line for listings.

    Returns
    -------
    callable
        The decorator; it returns the factory unchanged.

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered (a programming error, so not a ``CompressorError``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"architecture name must be a non-empty string, got {name!r}")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _ARCHS:
            raise ValueError(
                f"architecture {name!r} is already registered (by {_ARCHS[name].factory.__module__}); "
                "choose another name"
            )
        _ARCHS[name] = ArchSpec(
            name=name,
            factory=factory,
            input_shape=tuple(int(d) for d in input_shape),
            num_classes=int(num_classes),
            description=description,
        )
        return factory

    return decorator


def list_archs() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_ARCHS)


def get_arch(name: str) -> ArchSpec:
    """Look up an architecture by name.

    Raises
    ------
    compressor.errors.UnknownNameError
        If ``name`` is not registered; the message suggests close matches and lists the known names.
    """
    try:
        return _ARCHS[name]
    except KeyError:
        raise UnknownNameError("architecture", name, list_archs()) from None


def create_model(name: str, *, num_classes: int | None = None) -> nn.Module:
    """Build a freshly initialised model of a registered architecture.

    Parameters
    ----------
    name : str
        Registered architecture name (see :func:`list_archs`).
    num_classes : int, optional
        Number of outputs; defaults to the architecture's ``num_classes``.

    Returns
    -------
    torch.nn.Module
        The model, in training mode, on the CPU.

    Raises
    ------
    compressor.errors.UnknownNameError
        If ``name`` is not registered.
    compressor.errors.InputError
        If ``num_classes`` is not a positive integer.
    """
    spec = get_arch(name)
    if num_classes is None:
        num_classes = spec.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    return spec.factory(num_classes=num_classes)


def reinitialise(model: nn.Module, *, seed: int) -> nn.Module:
    """A copy of ``model`` with fresh random weights: every submodule's own ``reset_parameters`` (PyTorch's default
    initialisation for Conv/Linear/BatchNorm, which also resets BN running statistics), under ``torch.manual_seed``.

    Used by ``--at-init``: score a network before training (Westphal et al., arXiv:2411.00147, section 5).
    """
    fresh = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    finally:
        torch.random.set_rng_state(state)
    return fresh
