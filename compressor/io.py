"""Safe model loading and saving.

Loading a checkpoint never runs code unless the user says they trust it: every ``torch.load`` here uses
``weights_only=True`` except the single call behind ``trust_pickle=True``.

A compressed model is saved as plain tensors, strings and lists (it loads with ``weights_only=True``): the
architecture spec, the list of structural transforms that were applied (the pruning history), and the state_dict.
:func:`load_compressed` rebuilds the architecture, replays the transforms and loads the weights.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, ModelLoadError, OutputError
from .models import create_model, get_arch, list_archs
from .models.hub import hub_factory, is_hub_spec, parse_kwargs

FORMAT = "compressor.compressed/1"
PICKLED_ARCH = "<pickled nn.Module>"
ONNX_PREFIX = "onnx:"  # the arch of a model converted from an ONNX file: "onnx:<path>"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params")


@dataclass
class LoadedModel:
    """A model ready to compress, and where it came from."""

    model: nn.Module
    arch: str
    input_shape: tuple[int, ...] | None
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # --arch-kwargs, saved with the compressed model
    details: dict[str, Any] = field(default_factory=dict)  # extra facts for the report's model section


# --------------------------------------------------------------------------------------------------------- loading
def _read_checkpoint(path: Path, *, trust_pickle: bool) -> Any:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ModelLoadError(f"model file is not a readable file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # a pickle that names no Python object: corrupt, not code
            raise ModelLoadError(f"{path} is not a PyTorch checkpoint ({_first_line(exc)})") from None
        if not trust_pickle:
            raise ModelLoadError(
                f"{path} contains pickled Python objects (e.g. a whole nn.Module), and unpickling can run arbitrary "
                "code; re-save it as a state_dict (torch.save(model.state_dict(), 'weights.pt')) and pass --arch, "
                "or pass --trust-pickle if you trust where the file came from"
            ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises anything (IndexError, KeyError, ...) on corrupt files
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint ({_first_line(exc)})") from None
    try:  # the one place that unpickles arbitrary objects, reached only with trust_pickle=True
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - report any unpickling failure as a load error
        raise ModelLoadError(f"could not unpickle {path}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _unwrap(obj: Any) -> tuple[nn.Module | None, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Find the module or the state_dict inside the usual checkpoint wrappers."""
    meta: dict[str, Any] = {}
    for _ in range(3):
        if isinstance(obj, nn.Module):
            return obj, None, meta
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return None, _strip_prefix(dict(obj)), meta
        meta.update({k: v for k, v in obj.items() if isinstance(v, (str, int, float)) and isinstance(k, str)})
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
        if inner is None:
            break
        obj = inner
    return None, None, meta


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def resolve_arch(spec: str) -> tuple[Callable[..., nn.Module], tuple[int, ...] | None]:
    """A model factory for a built-in name, ``torchvision:NAME``, ``timm:NAME`` (see :mod:`compressor.models.hub`),
    ``path/to/file.py:fn`` or ``package.module:fn``.

    Importing a user's file runs it: that is the user's own code, named on the command line.
    """
    if ":" not in spec:
        arch = get_arch(spec)
        return (lambda **kw: create_model(spec, **kw)), tuple(arch.input_shape)
    if is_hub_spec(spec):
        return hub_factory(spec), None  # the input size comes from the data
    if spec.startswith(ONNX_PREFIX):
        from .onnx_input import onnx_factory  # local: onnx2torch is optional

        return onnx_factory(spec[len(ONNX_PREFIX):])
    target, _, fn_name = spec.rpartition(":")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise InputError(f"--arch {spec}: file not found: {file}")
        module_name = f"_compressor_user_{abs(hash(file.resolve()))}"
        module_spec = importlib.util.spec_from_file_location(module_name, file)
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"--arch {spec}: cannot import {file}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"--arch {spec}: cannot import module {target!r} ({_first_line(exc)})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"--arch {spec}: {target} has no callable {fn_name!r}")
    return fn, None


def _sizes_classifier(arch: str) -> bool:
    """Whether the factory of ``arch`` takes ``num_classes`` (built-in and hub architectures)."""
    return ":" not in arch or is_hub_spec(arch)


def _build(arch: str, num_classes: int | None,
           kwargs: Mapping[str, Any] | None = None) -> tuple[nn.Module, tuple[int, ...] | None]:
    factory, input_shape = resolve_arch(arch)
    kw = dict(kwargs or {})
    if num_classes and _sizes_classifier(arch):
        kw.setdefault("num_classes", num_classes)
    try:
        model = factory(**kw)
    except TypeError as exc:
        if kw and "keyword argument" in str(exc):
            raise InputError(f"--arch {arch} does not take --arch-kwargs {','.join(kw)} ({_first_line(exc)})") from None
        raise
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model, input_shape


def _classifier_outputs(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """Number of classes in ``state`` when only the final Linear layer's size differs from ``model``."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    key = f"{linears[-1]}.weight"
    if key in state and state[key].shape != model.state_dict()[key].shape:
        return int(state[key].shape[0])
    return None


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """``load_state_dict(strict=True)`` with actionable errors; old checkpoints without BN counters are accepted."""
    state = dict(state)
    expected = model.state_dict()
    for key in expected:  # pre-1.0 PyTorch checkpoints have no BatchNorm num_batches_tracked buffers
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(expected[key])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise ModelLoadError(f"state_dict does not match {what}: {', '.join(parts)} keys; is --arch right?")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"state_dict does not match {what}: {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the model; is --arch right?"
            )
    model.load_state_dict(state, strict=True)


def load_model(path: str | os.PathLike[str], *, arch: str | None = None, trust_pickle: bool = False,
               arch_kwargs: str | Mapping[str, Any] | None = None) -> LoadedModel:
    """Load a trained model from a checkpoint (+ architecture) or, with ``trust_pickle``, a pickled module.

    Parameters
    ----------
    path : path-like
        A state_dict, a checkpoint dict wrapping one (``state_dict``/``model``/... keys, ``module.`` prefixes from
        DataParallel are stripped), a model saved by compressor, or (only with ``trust_pickle``) a whole module.
    arch : str, optional
        Built-in name (see :func:`compressor.models.list_archs`), ``torchvision:NAME``, ``timm:NAME``,
        ``file.py:fn`` or ``package.module:fn``. Optional when the checkpoint records its ``arch``.
    trust_pickle : bool
        Allow unpickling arbitrary Python objects, which can run code. Off by default.
    arch_kwargs : str or mapping, optional
        Keyword arguments for the architecture's factory, e.g. ``"num_classes=10,drop_rate=0.1"``
        (:func:`compressor.models.hub.parse_kwargs`).

    A ``.onnx`` file is converted to PyTorch (:func:`compressor.onnx_input.load_onnx`, needs onnx2torch).
    """
    path = Path(path)
    kwargs = parse_kwargs(arch_kwargs)
    if path.suffix.lower() == ".onnx":
        from .onnx_input import load_onnx  # local: onnx2torch is optional

        if arch or kwargs:
            raise InputError(f"{path} is an ONNX graph, which holds its architecture; drop --arch/--arch-kwargs")
        return load_onnx(path)
    obj = _read_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        model = rebuild_compressed(obj)
        shape = obj.get("input_shape")
        return LoadedModel(model, str(obj["arch"]), tuple(shape) if shape else None, str(path), {"compressed": True})
    module, state, meta = _unwrap(obj)
    if module is not None:
        return LoadedModel(module.eval(), arch or PICKLED_ARCH, None, str(path), meta)
    if state is None:
        raise ModelLoadError(
            f"{path} holds no state_dict or model (top-level keys: {_keys(obj)}); save one with "
            "torch.save(model.state_dict(), path)"
        )
    arch = arch or meta.get("arch")
    if not arch:
        raise InputError(
            f"{path} holds only weights; pass --arch with a built-in architecture ({', '.join(list_archs())}) "
            "or a factory as path/to/file.py:fn"
        )
    model, input_shape = _build(arch, None, kwargs)
    num_classes = _classifier_outputs(model, state)
    if num_classes is not None and _sizes_classifier(arch) and "num_classes" not in kwargs:
        model, input_shape = _build(arch, num_classes, kwargs)
    load_state_strict(model, state, what=f"--arch {arch}")
    details = {"arch_kwargs": kwargs} if kwargs else {}
    return LoadedModel(model.eval(), arch, input_shape, str(path), meta, kwargs, details)


def _keys(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:6]]
        return ", ".join(keys) or "none"
    return type(obj).__name__


# ---------------------------------------------------------------------------------------------------- compressed
def compressed_payload(
    model: nn.Module, *, arch: str, input_shape: tuple[int, ...], transforms: list[dict[str, Any]],
    meta: dict[str, Any] | None = None, arch_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What :func:`save_compressed` writes: only tensors, strings, numbers, lists and dicts."""
    return {
        "format": FORMAT,
        "arch": arch,
        "input_shape": list(input_shape),
        "num_classes": meta.get("num_classes") if meta else None,
        "arch_kwargs": dict(arch_kwargs or {}),
        "transforms": transforms,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }


def rebuild_compressed(payload: Mapping[str, Any], *, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a compressed model from its payload (architecture + transforms + weights)."""
    from .methods import replay  # local: methods import torch-pruning, only needed here

    arch = str(payload["arch"])
    if arch == PICKLED_ARCH:
        if base is None:
            raise ModelLoadError(
                "this compressed model came from a pickled nn.Module; pass the original module as "
                "load_compressed(path, base=model)"
            )
        import copy

        model = copy.deepcopy(base)
    else:
        model, _ = _build(arch, payload.get("num_classes"), payload.get("arch_kwargs"))
    example = torch.zeros((1, *payload["input_shape"]))
    model = replay(model, payload["transforms"], example)
    load_state_strict(model, payload["state_dict"], what=f"the compressed {arch}")
    return model.eval()


def load_compressed(path: str | os.PathLike[str], *, base: nn.Module | None = None) -> nn.Module:
    """Load a model written by ``compress`` (``compressed.pt``) with ``torch.load(weights_only=True)``."""
    path = Path(path)
    obj = _read_checkpoint(path, trust_pickle=False)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise ModelLoadError(f"{path} was not written by compressor (no {FORMAT!r} marker)")
    return rebuild_compressed(obj, base=base)


# ----------------------------------------------------------------------------------------------------- atomic I/O
def atomic_save(write: Callable[[Path], object], path: Path) -> Path:
    """Run ``write(tmp)`` on a temp file beside ``path``, then rename it into place; no partial file on failure.

    The temp name is chosen here rather than by ``mkstemp`` so the final file gets the usual umask permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_out_folder(out: str | os.PathLike[str], names: Iterable[str], *, overwrite: bool = False) -> Path:
    """Fail before any work when the folder ``out`` cannot take the outputs ``names``: it is a file, already holds
    one of them (without ``overwrite``), or is not writable."""
    path = Path(out)
    check_writable_dir(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory")
    taken = [name for name in names if (path / name).exists()]
    if taken and not overwrite:
        raise OutputError(f"--out {out} already holds {taken[0]}; choose a new --out or pass --overwrite")
    return path


@contextlib.contextmanager
def staging(out: Path | None, *, prefix: str) -> Iterator[Path]:
    """A temporary folder for a run's outputs, removed on exit whatever happens: beside ``out`` (in its nearest
    existing ancestor, so :func:`publish`'s moves are renames on one filesystem), or in the system's temp folder
    when nothing is written. Outputs go here first, so a failed run leaves no partial file in ``out``."""
    parent = None
    if out is not None:
        parent = out.resolve()
        while not parent.exists():
            parent = parent.parent
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out: Path, names: Iterable[str]) -> dict[str, Path]:
    """Move the finished files ``names`` that exist in ``stage`` into ``out`` (each an atomic rename); their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in names:
        if (stage / name).exists():
            os.replace(stage / name, out / name)
            files[name] = out / name
    return files


def check_writable_dir(path: Path) -> None:
    """Fail early (before any work) when ``path`` cannot be created or written."""
    probe_parent = path
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir():
        raise OutputError(f"--out {path}: {probe_parent} is a file, not a directory")
    if not os.access(probe_parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {path}: {probe_parent} is not writable; choose another --out")
