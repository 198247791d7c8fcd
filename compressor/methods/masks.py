"""Unstructured weight masks that survive training, saving, replay and export (``--method imp --imp-granularity
weight``).

A masked layer (``nn.Conv*`` or ``nn.Linear``) carries its mask as a plain boolean buffer :data:`MASK`
(``sparsity_mask``, same shape as ``weight``, True = kept) and its weight holds exact zeros where the mask is False.
The model stays made of ordinary modules, so:

* ``state_dict`` holds the masks (bool tensors: ``compressed.pt`` still loads with ``torch.load(weights_only=True)``);
  the replay record ``{"kind": "mask", "layers": [names]}`` re-creates the buffers on a freshly built model before
  :func:`compressor.io.load_compressed` loads the weights (:func:`replay_mask`);
* the ONNX graph has no mask operator: the exporter sees dense weights that are zero where pruned (it ignores the
  unused buffers), so the zeros are the initialisers' zeros and the file compresses well with deflate;
* training keeps them with :class:`MaskKeeper`, a :class:`~compressor.training.Callback` of the one Trainer.

Why not keep :mod:`torch.nn.utils.prune`'s re-parametrisation (``weight_orig`` parameter + forward pre-hook) in the
model: the hook is Python state that ``weights_only`` loading, ``copy.deepcopy`` round trips through files and the
ONNX exporter do not carry as such (the graph would hold ``weight_orig`` and a ``Mul`` by the mask), and
torch-pruning's graph would see a parameter that is not ``weight``. The mask *selection* still uses
:func:`torch.nn.utils.prune.global_unstructured` (:func:`global_magnitude_masks`), on a throw-away copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import ModelLoadError
from .base import register_replay
from ..training import Callback, TrainState

MASK = "sparsity_mask"
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Conv and Linear layers with a ``weight`` parameter, by name, except those in ``ignore``."""
    skip = set(ignore)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _LAYERS) and isinstance(getattr(m, "weight", None), nn.Parameter) and name not in skip}


def global_magnitude_masks(model: nn.Module, names: Iterable[str], *, count: int,
                           previous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks removing ``count`` more weights of the layers ``names`` together: the smallest :math:`|w|` among those
    not already removed by ``previous`` (global magnitude pruning, Han et al. 2015; Frankle & Carbin 2019).

    Done by :func:`torch.nn.utils.prune.global_unstructured` with ``L1Unstructured`` on a copy of ``model``: the
    ``previous`` masks are registered first (``custom_from_mask``), so torch's ``PruningContainer`` chooses only among
    the surviving entries. ``model`` is not modified. Returns ``{name: bool tensor}`` (True = kept).
    """
    names = list(names)
    work = copy.deepcopy(model).cpu()
    params = []
    for name in names:
        layer = work.get_submodule(name)
        if previous is not None and name in previous:
            prune.custom_from_mask(layer, "weight", previous[name].to(weight_of(layer).device))
        params.append((layer, "weight"))
    if count > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=int(count))
    masks = {}
    for name, (layer, _) in zip(names, params):
        mask = getattr(layer, "weight_mask", None)
        masks[name] = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(weight_of(layer),
                                                                                          dtype=torch.bool)
    return masks


def weight_of(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` (every layer this module handles has one)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} has no weight tensor")
    return weight


def mask_of(layer: nn.Module) -> torch.Tensor | None:
    """The :data:`MASK` buffer of ``layer``, or None."""
    mask = getattr(layer, MASK, None)
    return mask if isinstance(mask, torch.Tensor) else None


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Attach ``masks`` (by layer name) to ``model`` as :data:`MASK` buffers and zero the masked weights; in place."""
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        weight, existing = weight_of(layer), mask_of(layer)
        mask = mask.to(device=weight.device, dtype=torch.bool)
        if existing is not None:
            existing.copy_(mask)
        else:
            layer.register_buffer(MASK, mask.clone())
        with torch.no_grad():
            weight.mul_(mask)
    return model


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer of ``model`` that carries a :data:`MASK` buffer."""
    return [(name, m) for name, m in model.named_modules() if mask_of(m) is not None]


def sparsity(model: nn.Module) -> dict[str, Any]:
    """Zeros in the weights of every Conv/Linear layer: per layer ``{weights, zeros, sparsity}`` and ``overall``
    (zeros / weights over all of them; biases and BatchNorm are not counted, as in Frankle & Carbin 2019)."""
    layers, total, zeros = {}, 0, 0
    for name, layer in prunable_layers(model).items():
        weight = weight_of(layer)
        n, z = weight.numel(), int((weight == 0).sum())
        layers[name] = {"weights": n, "zeros": z, "sparsity": round(z / n, 6)}
        total, zeros = total + n, zeros + z
    return {"overall": round(zeros / max(total, 1), 6), "weights": total, "zeros": zeros, "layers": layers}


class MaskKeeper(Callback):
    """Keeps the :data:`MASK` buffers of the trained model in force: the masked gradients are zeroed before each
    optimizer step (so momentum never builds up there) and the masked weights are zeroed again after it (weight decay,
    AdamW's decoupled decay and AMP's skipped steps included).

    ``record`` is the mask record to hand back after training; :meth:`report` gives the sparsity measured after
    training (``achieved`` and ``imp.sparsity``, merged into the method's report).
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.measured: dict[str, Any] | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.pairs = [(weight_of(layer), cast(torch.Tensor, mask_of(layer))) for _, layer in masked_layers(state.model)]
        self._zero_weights()

    def on_after_backward(self, state: TrainState) -> None:
        for weight, mask in self.pairs:
            if weight.grad is not None:
                weight.grad.mul_(mask)

    def on_step_end(self, state: TrainState) -> None:
        self._zero_weights()

    def on_train_end(self, state: TrainState) -> None:
        self.measured = sparsity(state.model)

    def _zero_weights(self) -> None:
        with torch.no_grad():
            for weight, mask in self.pairs:
                weight.mul_(mask)

    def records(self) -> list[dict[str, Any]]:
        return [self.record]

    def report(self) -> dict[str, Any]:
        if self.measured is None:
            return {}
        return {"achieved": self.measured["overall"], "imp": {"sparsity": self.measured}}


def replay_mask(model: nn.Module, record: Mapping[str, Any], example: torch.Tensor) -> nn.Module:
    """Re-create the :data:`MASK` buffers named by a ``mask`` record on a freshly built model (all True here; the
    saved state_dict then loads the real masks and the zeroed weights)."""
    for name in record.get("layers", []):
        try:
            weight = weight_of(model.get_submodule(str(name)))
        except (AttributeError, TypeError):
            raise ModelLoadError(f"the saved mask record names {name!r}, which is not a layer with a weight in the "
                                 "rebuilt model; was it saved by another version of the architecture?") from None
        apply_masks(model, {str(name): torch.ones_like(weight, dtype=torch.bool)})
    return model


register_replay("mask", replay_mask)
