"""Normalisation specs, vectorised augmentation and the in-memory batch loader."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, InputError
from ._dataset import ImageDataset


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std``, applied to images scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "custom"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a float NCHW batch (returns a new tensor)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


NORMALIZATIONS = {
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet"),
    "cifar": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar"),
}
_NORMALIZE_FORMS = "imagenet, cifar, none, or per-channel 'mean/std' such as 0.5,0.5,0.5/0.25,0.25,0.25"


def parse_normalize(spec: str | Normalization | None) -> Normalization | None:
    """Parse a normalisation spec.

    Parameters
    ----------
    spec : str
        ``imagenet``, ``cifar``, ``none`` (also ``None``), or ``m1,...,mC/s1,...,sC`` for any channel count C.
        A :class:`Normalization` is returned unchanged.

    Returns
    -------
    Normalization or None
        None means "no normalisation" (images only scaled to [0, 1]).

    Raises
    ------
    InputError
        Unknown name, malformed numbers, mismatched mean/std lengths, or a std that is not > 0.
    """
    if spec is None or isinstance(spec, Normalization):
        return spec
    text = str(spec).strip().lower()
    if text == "none":
        return None
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    if "/" not in text:
        close = difflib.get_close_matches(text, [*NORMALIZATIONS, "none"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown normalisation {spec!r}.{hint} Use {_NORMALIZE_FORMS}")
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in text.split("/"))
    except ValueError:
        raise InputError(f"cannot parse normalisation {spec!r}: expected {_NORMALIZE_FORMS}") from None
    if len(mean) != len(std):
        raise InputError(f"normalisation {spec!r} has {len(mean)} means but {len(std)} stds; give one per channel")
    if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
        raise InputError(f"normalisation {spec!r}: means must be finite and every std > 0")
    return Normalization(tuple(mean), tuple(std), "custom")


def augment_batch(x: torch.Tensor, *, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding plus a random horizontal flip, per image, vectorised.

    Parameters
    ----------
    x : torch.Tensor
        Float NCHW batch in pixel space (before normalisation, so the padding is black).
    generator : torch.Generator
        Source of randomness; the same generator state gives the same batch.
    padding : int
        Pixels of zero padding on every side; crops are offset by 0..2*padding.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class Loader:
    """Iterable of ``(x, y)`` batches over an :class:`ImageDataset`; see :func:`make_loader`."""

    def __init__(self, dataset: ImageDataset, *, batch_size: int, normalize: Normalization | None, shuffle: bool,
                 augment: bool, seed: int, drop_last: bool) -> None:
        self.dataset, self.batch_size, self.normalize = dataset, batch_size, normalize
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for batch in range(len(self)):
            sl = slice(batch * self.batch_size, min(n, (batch + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            x, y = self.dataset.x[idx], self.dataset.y[idx]
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            if self.augment:
                x = augment_batch(x, generator=self.generator)
            if self.normalize is not None:
                x = self.normalize(x)
            yield x, y


def make_loader(dataset: ImageDataset, *, batch_size: int, normalize: Normalization | str | None,
                shuffle: bool = False, augment: bool = False, seed: int = 0, drop_last: bool = False) -> Loader:
    """Batches of normalised float32 NCHW images and int64 labels, straight from memory.

    Parameters
    ----------
    dataset : ImageDataset
    batch_size : int
        Images per batch (> 0); the last batch is smaller unless ``drop_last``.
    normalize : Normalization, str or None
        Applied after scaling uint8 pixels to [0, 1]; a string goes through :func:`parse_normalize`.
    shuffle : bool
        Draw a new order every time the loader is iterated (every epoch).
    augment : bool
        Random crop with 4 pixels of zero padding and a horizontal flip (see :func:`augment_batch`).
    seed : int
        Seeds the loader's own ``torch.Generator``: two loaders built with the same seed give the same batches
        epoch after epoch. The global torch RNG is not touched.
    drop_last : bool
        Skip the final incomplete batch.

    Returns
    -------
    Loader
        Has ``len()`` (batches per epoch); yields CPU tensors.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch size must be a positive integer; got {batch_size!r}")
    norm = parse_normalize(normalize)
    channels = dataset.image_shape[0]
    if norm is not None and len(norm.mean) != channels:
        raise DataError(f"normalisation {norm.name!r} has {len(norm.mean)} channels but {dataset.source} has "
                        f"{channels}-channel images; pass a mean/std with {channels} values (or 'none')")
    return Loader(dataset, batch_size=batch_size, normalize=norm, shuffle=shuffle, augment=augment, seed=seed,
                  drop_last=drop_last)
