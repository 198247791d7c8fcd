"""Activation capture shared by the data-driven methods (``cmi``, ``mipp``, ``tucker``'s shape probe)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def recording(model: nn.Module, points: Sequence[tuple[str, bool]],
              record: Callable[[tuple[str, bool], torch.Tensor], None]) -> Iterator[None]:
    """Call ``record((name, output?), tensor)`` with the detached input (``output?`` False) or output of each
    ``(module name, output?)`` point at every forward call, in execution order, with the model in eval mode.

    The data-driven scorers (``cmi``, ``mipp``) read activations through this. Hooks are removed and the model's
    train/eval mode restored in ``finally``; nothing is set on the user's modules.
    """
    modules = dict(model.named_modules())
    handles, was_training = [], model.training

    def make(key: tuple[str, bool]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any = None) -> None:
            record(key, (output if key[1] else args[0]).detach())
        return hook

    try:
        for key in points:
            module = modules[key[0]]
            register = module.register_forward_hook if key[1] else module.register_forward_pre_hook
            handles.append(register(make(key)))
        model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
