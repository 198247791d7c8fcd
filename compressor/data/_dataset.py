"""``ImageDataset`` (images and labels in memory), class-balanced calibration subsets, and the checks that a
dataset fits the model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DataError, InputError


def standard_nchw(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a freshly allocated NCHW tensor (a copy only when they differ).

    ``Tensor.contiguous()`` is not enough: it ignores the strides of size-1 dimensions, so one-channel images
    transposed from NHWC keep strides ``(H*W, 1, W, 1)``, which convolutions read as channels-last; their outputs
    are then channels-last and a model that flattens with ``x.view(-1, n)`` fails ("view size is not compatible
    with input tensor's size and stride").
    """
    standard: list[int] = []
    step = 1
    for size in reversed(x.shape):
        standard.insert(0, step)
        step *= size
    return x if x.stride() == tuple(standard) else x.clone(memory_format=torch.contiguous_format)


class ImageDataset(torch.utils.data.Dataset):
    """An in-memory image classification dataset.

    Parameters
    ----------
    x : torch.Tensor
        Images, NCHW, ``uint8`` (pixels 0..255) or ``float32`` (taken as scaled to [0, 1]); other floats are cast.
    y : torch.Tensor
        Integer labels, shape (N,); stored as ``int64``.
    source : str
        Where the data came from, used in error messages.
    class_names : sequence of str, optional
        Names of the labels ``0..K-1`` when the format has them (ImageFolder).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, source: str = "<memory>",
                 class_names: Sequence[str] | None = None) -> None:
        if x.ndim != 4:
            raise DataError(f"{source}: images must be a 4-D NCHW array; got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            if not x.dtype.is_floating_point:
                raise DataError(f"{source}: images must be uint8 or float; got {x.dtype}")
            x = x.to(torch.float32)
        if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(f"{source}: labels must be a 1-D integer array; got {y.dtype} of shape {tuple(y.shape)}")
        if len(x) != len(y):
            raise DataError(f"{source}: {len(x)} images but {len(y)} labels; x and y must have the same length")
        self.x, self.y = standard_nchw(x), y.to(torch.int64)
        self.source = source
        self.class_names = tuple(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], int(self.y[index])

    def __repr__(self) -> str:
        return (f"ImageDataset(n={len(self)}, image_shape={self.image_shape}, dtype={self.x.dtype}, "
                f"classes_seen={self.num_classes_seen}, source={self.source!r})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes_seen(self) -> int:
        """Number of distinct labels present (not ``max + 1``: a subset may miss classes)."""
        return int(torch.unique(self.y).numel())

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageDataset:
        """A new dataset holding the images at ``indices`` (copied), in that order."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64)).reshape(-1)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise InputError(f"subset indices must lie in [0, {len(self)}); got {int(idx.min())}..{int(idx.max())}")
        return ImageDataset(self.x[idx], self.y[idx], source=self.source, class_names=self.class_names)


def calibration_subset(dataset: ImageDataset, n: int, *, seed: int) -> ImageDataset:
    """``n`` images drawn as evenly over the classes as their counts allow, deterministic for a seed.

    Each class gets ``n // K`` images (K = classes present); classes with fewer images give their share to the
    others, and the remainder goes to classes in a seeded random order. ``n >= len(dataset)`` returns ``dataset``.
    The chosen indices are returned in dataset order.
    """
    if not isinstance(n, int) or n <= 0:
        raise InputError(f"the number of calibration images must be a positive integer; got {n!r}")
    if n >= len(dataset):
        return dataset
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(dataset.y, return_counts=True)
    perm = torch.randperm(len(classes), generator=gen)
    order = perm[torch.argsort(counts[perm], stable=True)]  # smallest classes first; ties in seeded order
    take = torch.zeros_like(counts)
    remaining = n
    for i, k in enumerate(order.tolist()):  # water-filling: a small class passes its unused share on
        take[k] = min(int(counts[k]), remaining // (len(order) - i))
        remaining -= int(take[k])
    for k in perm.tolist():  # only reached when floors left a few images over
        extra = min(remaining, int(counts[k] - take[k]))
        take[k] += extra
        remaining -= extra
    chosen = []
    for k, label in enumerate(classes.tolist()):
        members = torch.nonzero(dataset.y == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[: int(take[k])]])
    return dataset.subset(torch.sort(torch.cat(chosen)).values)


_CHANNEL_FIX = {(1, 3): "convert the images to RGB (repeat the grey channel)",
                (3, 1): "convert the images to grayscale (PIL mode 'L')",
                (4, 3): "drop the alpha channel (save the images as RGB)"}


def check_dataset(dataset: ImageDataset, *, input_shape: Sequence[int | None] | None, num_classes: int | None,
                  name: str) -> None:
    """Raise a one-line :class:`DataError` if ``dataset`` cannot feed the model.

    Parameters
    ----------
    dataset : ImageDataset
    input_shape : sequence, optional
        The model's ``(C, H, W)`` (a leading batch dimension is ignored). ``H``/``W`` may be None to accept any
        spatial size (networks with global pooling); None skips the shape check.
    num_classes : int, optional
        Outputs of the classifier; labels must lie in ``[0, num_classes)``. None skips the label check.
    name : str
        How the data is named in the message, e.g. ``--data``.
    """
    if len(dataset) == 0:
        raise DataError(f"{name} ({dataset.source}) holds no images; point it at a non-empty dataset")
    if input_shape is not None:
        want = tuple(input_shape)[-3:]
        c, h, w = dataset.image_shape
        if want[0] is not None and c != want[0]:
            fix = _CHANNEL_FIX.get((c, want[0]), f"store {want[0]}-channel images")
            raise DataError(f"{name} has {c}-channel images ({c}x{h}x{w}) but the model expects {want[0]} channels "
                            f"({'x'.join(str(v) for v in want)}); {fix}")
        if any(m is not None and m != d for m, d in zip(want[1:], (h, w))):
            raise DataError(f"{name} images are {c}x{h}x{w} but the model expects {'x'.join(str(v) for v in want)}; "
                            f"resize the images to {want[1]}x{want[2]}")
    if num_classes is not None:
        lo, hi = int(dataset.y.min()), int(dataset.y.max())
        if lo < 0 or hi >= num_classes:
            hint = "; they look 1-based: subtract 1" if lo >= 1 and hi == num_classes else ""
            raise DataError(f"{name} labels span {lo}..{hi} but the classifier has {num_classes} outputs "
                            f"(labels 0..{num_classes - 1}){hint}")
