"""Readers for the dataset formats of :func:`load_dataset`.

The CIFAR-10 "python version" files are pickles. They are read by :class:`_ArrayUnpickler`, whose ``find_class``
only hands out the numpy functions that rebuild arrays; any other global (``os.system``, ``builtins.exec``, ...)
raises :class:`DataError` before the object is built, so a crafted file cannot run code. A factory spec, on the
other hand, imports and runs the named Python code on purpose: the user named it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ._dataset import ImageDataset

logger = logging.getLogger(__name__)

MAX_BYTES = 4 * 2**30
"""Default cap on the memory a materialised dataset (ImageFolder, factory Dataset) may take."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_FORMATS = ("a .npz with arrays x and y, an ImageFolder directory (one sub-directory per class), a CIFAR-10 python "
            "directory or batch file (data_batch_1, test_batch), or a factory 'file.py:fn' / 'package.module:fn'")
_FACTORY = re.compile(r"^(?P<target>.+):(?P<fn>[A-Za-z_]\w*)$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def load_dataset(spec: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES) -> ImageDataset:
    """Load a dataset from a path or factory spec (see the module docstring for the formats).

    Parameters
    ----------
    spec : str or path
        ``data.npz``, an ImageFolder or CIFAR-10 directory, a CIFAR-10 batch file, ``file.py:fn`` or ``pkg.mod:fn``.
    max_bytes : int
        Largest dataset that an ImageFolder or a factory Dataset may be materialised into.

    Returns
    -------
    ImageDataset

    Raises
    ------
    DataError
        Missing or unreadable path, unknown format, missing arrays, inconsistent lengths or image sizes, a pickle
        that holds anything but arrays, a factory that cannot be imported or returns something else.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if not path.exists():
        match = _FACTORY.match(text)
        if match and (match["target"].endswith(".py") or _MODULE.match(match["target"])):
            return _load_factory(match["target"], match["fn"], text, max_bytes=max_bytes)
        raise DataError(f"data {text!r}: no such file or directory; expected {_FORMATS}")
    if path.is_dir():
        nested = path / "cifar-10-batches-py"  # the folder the CIFAR-10 tarball extracts to
        batches = _cifar_batches(nested if nested.is_dir() else path)
        if batches:
            return _load_cifar(batches, source=str(path))
        return _load_image_folder(path, max_bytes=max_bytes)
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    if path.suffix.lower() == ".py":
        raise DataError(f"data {text!r}: name the function that builds the dataset, e.g. '{text}:make_dataset'")
    try:
        with path.open("rb") as fh:
            head = fh.read(1)
    except OSError as exc:
        raise DataError(f"cannot read data {text!r}: {exc.strerror or exc}") from None
    if head == b"\x80":  # pickle protocol >= 2, as the CIFAR-10 python batches are
        return _load_cifar([path], source=str(path))
    raise DataError(f"data {text!r}: unknown format; expected {_FORMATS}")


def _from_arrays(x: Any, y: Any, *, source: str) -> ImageDataset:
    """Build an ImageDataset from array-likes, finding the channel axis and checking dtypes."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if x.ndim == 3:  # N, H, W: one grey channel
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: x must hold images as N,H,W,C or N,C,H,W; got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{source}: integer x must hold pixels in 0..255; found {x.min()}..{x.max()} ({x.dtype})")
        x = x.astype(np.uint8)
    if x.dtype == np.uint8:
        order = ("NHWC", "NCHW")  # uint8 images are usually stored NHWC, float tensors NCHW
    elif np.issubdtype(x.dtype, np.floating):
        order = ("NCHW", "NHWC")
        x = x.astype(np.float32, copy=False)
        if x.size and float(x.max()) > 1.5:
            logger.warning("%s: float images go up to %.4g; float data is taken as already scaled to [0, 1] "
                           "(store uint8 pixels, or divide by 255)", source, float(x.max()))
    else:
        raise DataError(f"{source}: x must be uint8 pixels or floats in [0, 1]; got dtype {x.dtype}")
    layout = next((o for o in order if x.shape[3 if o == "NHWC" else 1] in (1, 3, 4)), None)
    if layout is None:
        raise DataError(f"{source}: cannot find the channel axis of x with shape {x.shape}; expected N,H,W,C or "
                        "N,C,H,W with C in (1, 3, 4)")
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        hint = "; for one-hot labels store y.argmax(1)" if y.ndim == 2 else ""
        raise DataError(f"{source}: y must be a 1-D array of integer class labels; got {y.dtype} {y.shape}{hint}")
    if len(x) != len(y):
        raise DataError(f"{source}: x holds {len(x)} images but y holds {len(y)} labels; they must match")
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)),
                        source=source)


def _load_npz(path: Path) -> ImageDataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found {archive.files or 'none'}. "
                                "Save with np.savez(path, x=images, y=labels)")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # not a zip, truncated, or object arrays (need pickle)
        raise DataError(f"cannot read {path} as a .npz of numeric arrays x and y: {exc}") from None
    return _from_arrays(x, y, source=str(path))


def _numpy_global(module: str, name: str) -> Any:
    """Resolve an allowed numpy global without the deprecated ``numpy.core`` alias of numpy 2."""
    if module == "numpy":
        return getattr(np, name)
    tail = module.rsplit(".", 1)[1]
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + tail), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"cannot resolve numpy global {module}.{name}")  # pragma: no cover


# CIFAR-10 batches were pickled from numpy arrays; these are the only globals such a file needs.


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to the latin-1 case."""
    if encoding != "latin1":
        raise DataError(f"refusing to unpickle _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers, and refuses every other global."""

    def __init__(self, file: Any, *, source: str) -> None:
        super().__init__(file, encoding="bytes")  # the CIFAR files come from Python 2
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return _numpy_global(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise DataError(f"refusing to unpickle {module}.{name} from {self.source}: a CIFAR-10 batch holds only "
                        "numpy arrays and lists; this file is not one (or has been tampered with)")


def _cifar_batches(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("data_batch_*") if p.is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _load_cifar(files: list[Path], *, source: str) -> ImageDataset:
    xs, ys = [], []
    for path in files:
        try:
            with path.open("rb") as fh:
                batch = _ArrayUnpickler(fh, source=str(path)).load()
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoding failure means "not a CIFAR batch"
            raise DataError(f"cannot read {path} as a CIFAR-10 python batch: {type(exc).__name__}: {exc}") from None
        if not isinstance(batch, dict):
            raise DataError(f"{path}: a CIFAR-10 batch is a dict with 'data' and 'labels'; got {type(batch).__name__}")
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data, labels = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072); got {got}")
        if labels is None or len(labels) != len(data):
            raise DataError(f"{path}: 'labels' must list one label per image ({len(data)}); "
                            f"got {'none' if labels is None else len(labels)}")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 R, 1024 G, 1024 B values, each 32x32 row-major
        ys.append(np.asarray(labels, dtype=np.int64))
    return ImageDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), source=source)


def _load_image_folder(root: Path, *, max_bytes: int) -> ImageDataset:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow is a declared dependency
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((root / name).iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        loose = any(f.suffix.lower() in IMAGE_SUFFIXES for f in root.iterdir())
        raise DataError(f"{root}: no images found in class sub-directories"
                        f"{' (images must sit in one sub-directory per class, not at the top)' if loose else ''}; "
                        f"expected {_FORMATS}")
    size: tuple[int, int] | None = None
    modes: set[str] = set()
    for f, _ in files:  # headers only: check sizes before decoding anything
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
                if size is None:
                    size, first = im.size, f
                elif im.size != size:
                    raise DataError(f"{f}: image is {im.size[0]}x{im.size[1]} but {first} is {size[0]}x{size[1]}; "
                                    "all images must share one size (resize them first)")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {f}: {exc}") from None
    assert size is not None  # files is not empty, so the loop above set it
    mode = "L" if modes <= {"1", "L", "LA"} else "RGB"
    channels = 1 if mode == "L" else 3
    need = len(files) * channels * size[0] * size[1]
    if need > max_bytes:
        raise DataError(f"{root}: {len(files)} images of {size[0]}x{size[1]} need {need / 2**30:.1f} GiB in memory "
                        f"(limit {max_bytes / 2**30:.1f} GiB); use a subset or a .npz")
    x = np.empty((len(files), size[1], size[0], channels), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                x[i] = np.asarray(im.convert(mode)).reshape(size[1], size[0], channels)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot decode image {f}: {exc}") from None
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(torch.from_numpy(x).permute(0, 3, 1, 2), y, source=str(root), class_names=classes)


def _load_factory(target: str, fn_name: str, spec: str, *, max_bytes: int) -> ImageDataset:
    """Import ``target`` (a .py file or a module name), call ``fn_name()`` and turn its result into a dataset."""
    if target.endswith(".py"):
        file = Path(target).expanduser()
        if not file.is_file():
            raise DataError(f"data {spec!r}: no such file {file}")
        name = "_compressor_data_" + re.sub(r"\W", "_", file.stem)
        module_spec = importlib.util.spec_from_file_location(name, file)
        if module_spec is None or module_spec.loader is None:
            raise DataError(f"data {spec!r}: cannot import {file} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling inside the user's file look their module up here
        module_spec.loader.exec_module(module)  # runs the user's code: they named it
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name is None or not target.startswith(exc.name):
                raise  # the module exists but imports something missing: the user's traceback is more useful
            raise DataError(f"data {spec!r}: no module named {exc.name!r} (is it on PYTHONPATH?)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise DataError(f"data {spec!r}: {target} has no function {fn_name!r}")
    result = fn()
    source = f"{spec} (factory)"
    if isinstance(result, ImageDataset):
        return result
    if isinstance(result, tuple) and len(result) == 2 and not isinstance(result[0], torch.utils.data.Dataset):
        return _from_arrays(*result, source=source)
    if (hasattr(result, "__getitem__") and hasattr(result, "__len__")) or hasattr(result, "__iter__"):
        return _materialise(result, source=source, max_bytes=max_bytes)
    raise DataError(f"data {spec!r}: {fn_name}() returned {type(result).__name__}; expected a torch Dataset of "
                    "(image CHW tensor, int label) or a tuple (x, y) of arrays")


def _materialise(ds: Any, *, source: str, max_bytes: int) -> ImageDataset:
    """Stack a map-style or iterable dataset into memory, stopping with an error past ``max_bytes``."""
    sized = hasattr(ds, "__len__") and hasattr(ds, "__getitem__")
    items = (ds[i] for i in range(len(ds))) if sized else iter(ds)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"{source}: item {i} is {type(item).__name__}; expected (image CHW tensor, int label)")
        img = torch.as_tensor(np.asarray(item[0]) if not isinstance(item[0], torch.Tensor) else item[0])
        if img.ndim != 3 or (images and img.shape != images[0].shape):
            want = f"shape {tuple(images[0].shape)} like item 0" if images else "a 3-D CHW image"
            raise DataError(f"{source}: item {i} has an image of shape {tuple(img.shape)}; expected {want}")
        images.append(img)
        labels.append(int(item[1]))
        if (len(ds) if sized else i + 1) * img.numel() * img.element_size() > max_bytes:
            raise DataError(f"{source}: the dataset needs more than {max_bytes / 2**30:.2f} GiB in memory; "
                            "return a smaller subset, or a tuple (x, y) of uint8 arrays")
    if not images:
        raise DataError(f"{source}: the factory's dataset is empty")
    x = torch.stack(images)
    if x.is_floating_point():
        x = x.float()
    elif x.dtype != torch.uint8:
        return _from_arrays(x, torch.tensor(labels), source=source)  # integer pixels: range-checked there
    return ImageDataset(x, torch.tensor(labels, dtype=torch.int64), source=source)
