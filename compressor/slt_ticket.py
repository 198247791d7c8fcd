"""The compact artefact of a strong lottery ticket (``ticket.slt``) and its size in bits.

A ticket is stored as the seeds and options that regenerate its random source network and freezing pattern
(:mod:`compressor.slt`), one packed mask bit per *searched* weight, and the BatchNorm running statistics (the only
floats: layers have no bias and BatchNorm no affine parameters). :func:`load_slt` rebuilds the exact network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError, ModelLoadError
from .io import atomic_save
from .slt import FORMAT, SEARCHED, SLTConfig, make_slt, materialize, plans_of, slt_layers

__all__ = ["SEED_BITS", "build_arch", "fp32_bits", "load_slt", "rebuild_from_payload", "save_ticket", "size_bits",
           "ticket_payload"]

SEED_BITS = 64  # one seed, stored as a 64-bit integer
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


# ------------------------------------------------------------------------------------------------ the artefact
def _bn_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"running_mean": m.running_mean.detach().cpu().clone(),  # type: ignore[union-attr]
                   "running_var": m.running_var.detach().cpu().clone()}  # type: ignore[union-attr]
            for name, m in model.named_modules() if isinstance(m, _BNS)}


def _bits_in_order(model: nn.Module) -> np.ndarray:
    """The mask bit of every searched weight, layer by layer, each layer in flattened (row-major) order."""
    chunks = []
    with torch.no_grad():
        for _, layer in slt_layers(model):
            searched = (layer.pattern == SEARCHED).flatten()
            chunks.append(layer.mask().flatten()[searched].cpu().numpy() > 0.5)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=bool)


def ticket_payload(model: nn.Module, *, arch: str, num_classes: int | None,
                   input_shape: Sequence[int] | None) -> dict[str, Any]:
    """What a ticket is stored as: the seeds and options that regenerate the source network and its freezing
    pattern, the packed mask bits of the searched weights (``numpy.packbits``, big-endian bit order), and the
    BatchNorm running statistics (the only floats). Plain tensors, strings and numbers: it loads with
    ``torch.load(weights_only=True)``."""
    cfg: SLTConfig = model.slt_config  # type: ignore[assignment]
    bits = _bits_in_order(model)
    return {"format": FORMAT, "arch": arch, "num_classes": num_classes,
            "input_shape": list(input_shape) if input_shape is not None else None,
            "config": cfg.to_dict(), "n_bits": int(bits.size),
            "mask_bits": torch.from_numpy(np.packbits(bits)), "bn": _bn_state(model)}


def save_ticket(model: nn.Module, path: str | os.PathLike[str], *, arch: str, num_classes: int | None = None,
                input_shape: Sequence[int] | None = None) -> Path:
    """Write :func:`ticket_payload` to ``path`` atomically."""
    payload = ticket_payload(model, arch=arch, num_classes=num_classes, input_shape=input_shape)
    return atomic_save(lambda tmp: torch.save(payload, tmp), Path(path))


def build_arch(arch: str, num_classes: int | None) -> nn.Module:
    from .io import resolve_arch

    factory, _ = resolve_arch(arch)
    model = factory(num_classes=num_classes) if (num_classes and ":" not in arch) else factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def rebuild_from_payload(payload: dict[str, Any], *, base: nn.Module | None = None) -> nn.Module:
    """The dense masked network of a stored ticket: the source regenerated from the seeds, the stored mask bits
    placed on the searched weights, the BatchNorm statistics loaded. ``base`` (an instance of the architecture)
    replaces building it from ``payload['arch']``."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelLoadError(f"not a compress slt ticket (expected format {FORMAT!r})")
    cfg = SLTConfig(**payload["config"])
    template = base if base is not None else build_arch(payload["arch"], payload["num_classes"])
    net = make_slt(template, cfg)
    bits = np.unpackbits(payload["mask_bits"].numpy(), count=int(payload["n_bits"])).astype(bool)
    expected = sum(p.searched for p in plans_of(net))
    if bits.size != expected:
        raise ModelLoadError(f"the ticket holds {bits.size} mask bits but its source network has {expected} searched "
                             "weights; the architecture does not match")
    offset = 0
    with torch.no_grad():
        for _, layer in slt_layers(net):
            searched = (layer.pattern == SEARCHED).flatten()
            n = int(searched.sum())
            chosen = torch.zeros(layer.pattern.numel(), dtype=torch.bool)
            chosen[searched.nonzero().flatten()] = torch.from_numpy(bits[offset:offset + n].copy())
            offset += n
            # scores that reproduce the stored choice exactly: 1 on chosen searched weights, 0.5 on the others
            layer.scores.copy_(torch.where(chosen, 1.0, torch.where(searched, 0.5, 0.0)).view_as(layer.scores))
            layer.topk = int(chosen.sum())
    norms = dict(net.named_modules())
    for name, stats in payload["bn"].items():
        bn = norms.get(name)
        if not isinstance(bn, _BNS):
            raise ModelLoadError(f"the ticket has BatchNorm statistics for {name!r}, which the architecture lacks")
        bn.running_mean.copy_(stats["running_mean"])  # type: ignore[union-attr]
        bn.running_var.copy_(stats["running_var"])  # type: ignore[union-attr]
    return materialize(net)


def load_slt(path: str | os.PathLike[str], *, base: nn.Module | None = None) -> nn.Module:
    """Rebuild the exact network of a ticket written by :func:`save_ticket` (or ``compress slt``'s ``ticket.slt``):
    a plain dense network in eval mode whose outputs are bit-identical to the network that was saved."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"ticket file not found: {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises anything on a corrupt file
        raise ModelLoadError(f"{file} is not a compress slt ticket ({type(exc).__name__})") from None
    return rebuild_from_payload(payload, base=base)


# ------------------------------------------------------------------------------------------------ accounting
def size_bits(model: nn.Module) -> dict[str, int]:
    """The ticket's size in bits, the paper's accounting plus what else must be stored: ``mask_bits`` (one per
    searched weight), ``seed_bits`` (weight and freezing seeds, 64 bits each), ``bn_bits`` (BatchNorm running mean and
    variance, float32), their ``total_bits``; and for comparison ``dense_source_mask_bits`` (one bit per weight: the
    ticket of the same network without freezing) and ``weights`` (the weights of the searched layers)."""
    plans = plans_of(model)
    bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, _BNS))  # type: ignore[misc]
    mask = sum(p.searched for p in plans)
    return {"mask_bits": mask, "seed_bits": 2 * SEED_BITS, "bn_bits": 32 * bn,
            "total_bits": mask + 2 * SEED_BITS + 32 * bn, "dense_source_mask_bits": sum(p.numel for p in plans),
            "weights": sum(p.numel for p in plans), "bn_floats": bn}


def fp32_bits(model: nn.Module) -> int:
    """Bits of a weight-trained float32 model: every parameter and every floating-point buffer (BN statistics)."""
    floats = sum(p.numel() for p in model.parameters())
    floats += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return 32 * floats
