"""Architectures from the ecosystem by name: ``--arch torchvision:NAME`` and ``--arch timm:NAME``.

Only the model *code* comes from torchvision or timm: the factory builds the architecture with random weights
(torchvision ``weights=None``, timm ``pretrained=False``) and the weights come from the checkpoint being compressed,
so nothing is ever downloaded. ``--arch-kwargs`` passes keyword arguments to the factory, typed by
:func:`parse_kwargs` (``num_classes=10,drop_rate=0.1,aux_logits=false``). When the checkpoint's classifier has another
size than the factory's default, :func:`compressor.io.load_model` rebuilds with that ``num_classes`` by itself.

Neither package is a dependency of compressor: a missing package, one that fails to import, and an unknown name are
one-line :class:`~compressor.errors.InputError` messages saying what to install or which names exist.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from compressor.errors import InputError

__all__ = ["HUBS", "INSTALL", "hub_factory", "is_hub_spec", "parse_kwargs"]

#: ``--arch`` prefixes served by :func:`hub_factory`.
HUBS = ("torchvision", "timm")
#: What to install for each hub (torchvision must be the release built for the installed torch).
INSTALL = {
    "torchvision": "pip install torchvision (the release paired with your torch, e.g. torchvision==0.28.0 for "
                   "torch 2.13, and the same build: CPU or CUDA)",
    "timm": "pip install timm",
}
#: Keyword arguments that would make a factory download weights; compressor takes weights from the checkpoint.
_DOWNLOADS = ("weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_hub_spec(spec: str) -> bool:
    """Whether ``spec`` is ``torchvision:NAME`` or ``timm:NAME``."""
    return spec.partition(":")[0] in HUBS and ":" in spec


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _import(hub: str, spec: str) -> Any:
    """``torchvision.models`` or ``timm``; a one-line error saying what to install when it is absent or broken."""
    module = "torchvision.models" if hub == "torchvision" else hub
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == hub:
            raise InputError(f"--arch {spec} needs {hub}, which is not installed: {INSTALL[hub]}") from None
        raise InputError(f"--arch {spec}: {hub} cannot be imported ({_first_line(exc)}); {INSTALL[hub]}") from None
    except Exception as exc:  # noqa: BLE001 - a wheel built for another torch fails with RuntimeError, OSError...
        if hub != "torchvision" and "torchvision" in str(exc):
            raise InputError(
                f"--arch {spec}: {hub} imports torchvision, which is installed but does not import with torch "
                f"{torch.__version__} ({_first_line(exc)}); {INSTALL['torchvision']}"
            ) from None
        raise InputError(
            f"--arch {spec}: {hub} is installed but does not import with torch {torch.__version__} "
            f"({_first_line(exc)}); install the {hub} build that matches this torch: {INSTALL[hub]}"
        ) from None


def _unknown(hub: str, name: str, known: list[str], how: str) -> InputError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return InputError(f"unknown {hub} model {name!r}.{hint} {how}")


def hub_factory(spec: str) -> Callable[..., nn.Module]:
    """A factory ``fn(**kwargs) -> nn.Module`` for ``torchvision:NAME`` or ``timm:NAME`` (random weights).

    Raises
    ------
    compressor.errors.InputError
        The package is not installed or does not import, or it has no classification model ``NAME``.
    """
    hub, _, name = spec.partition(":")
    if hub not in HUBS:
        raise InputError(f"--arch {spec}: unknown hub {hub!r}; use one of {', '.join(h + ':NAME' for h in HUBS)}")
    if not name:
        raise InputError(f"--arch {spec}: give a model name, e.g. --arch {hub}:resnet18")
    module = _import(hub, spec)
    if hub == "torchvision":
        known = sorted(module.list_models(module=module))  # classification models only
        if name not in known:
            raise _unknown(hub, name, known, f"torchvision's classification models: {', '.join(known)}.")

        def build_torchvision(**kwargs: Any) -> nn.Module:
            model: nn.Module = module.get_model(name, weights=None, **_checked(spec, kwargs))
            return model

        return build_torchvision
    if not module.is_model(name):
        raise _unknown(hub, name, list(module.list_models()),
                       "List timm's names with: python -c \"import timm; print(timm.list_models('*resnet*'))\"")

    def build_timm(**kwargs: Any) -> nn.Module:
        model: nn.Module = module.create_model(name, pretrained=False, **_checked(spec, kwargs))
        return model

    return build_timm


def _checked(spec: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    bad = [k for k in kwargs if k in _DOWNLOADS]
    if bad:
        raise InputError(f"--arch-kwargs {bad[0]}=...: compressor builds {spec} with random weights and loads the "
                         "checkpoint's; drop it")
    return dict(kwargs)


def _value(text: str) -> Any:
    """``10`` -> int, ``0.1``/``1e-3`` -> float, ``true``/``false`` -> bool, ``none`` -> None, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_kwargs(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--arch-kwargs`` as a dict: ``"num_classes=10,drop_rate=0.1,aux_logits=false"`` ->
    ``{"num_classes": 10, "drop_rate": 0.1, "aux_logits": False}`` (a mapping is returned as a dict).

    >>> parse_kwargs("num_classes=10,drop_rate=0.1,aux_logits=false,act_layer=gelu")
    {'num_classes': 10, 'drop_rate': 0.1, 'aux_logits': False, 'act_layer': 'gelu'}
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or not _KEY.match(k)]
        if bad:
            raise InputError(f"arch_kwargs keys must be Python identifiers, got {bad[0]!r}")
        return dict(value)
    out: dict[str, Any] = {}
    for item in (part.strip() for part in str(value).split(",")):
        if not item:
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key) or not text.strip():
            raise InputError(f"--arch-kwargs: {item!r} is not KEY=VALUE; e.g. --arch-kwargs num_classes=10,"
                             "drop_rate=0.1")
        if key in out:
            raise InputError(f"--arch-kwargs: {key} is given twice")
        out[key] = _value(text)
    return out
