"""Datasets, normalisation, augmentation and the checks that data fits the model.

Everything is in memory: a dataset is one image tensor and one label tensor, and a loader slices them into batches
(no worker processes). That is fast for CIFAR-sized data and small calibration sets, and keeps runs repeatable.

Formats accepted by :func:`load_dataset`:

- ``file.npz`` with arrays ``x`` (uint8 NHWC or float NCHW; uint8 NCHW and float NHWC are recognised from the channel
  axis, C in (1, 3, 4)) and ``y`` (integer labels), opened with ``allow_pickle=False``;
- an ImageFolder directory: one sub-directory per class, class names sorted to labels ``0..K-1``, images of one size;
- a CIFAR-10 "python version" directory (all ``data_batch_*``) or one batch file (e.g. ``test_batch``). These are
  pickles; they are read by a restricted unpickler that only rebuilds numpy arrays, so a crafted file cannot run code;
- a factory ``path/to/file.py:fn`` or ``package.module:fn``: ``fn()`` returns a torch Dataset of ``(CHW tensor, label)``
  or a tuple ``(x, y)`` of arrays. **This imports and runs the named Python code**, as the user asked for it by name.

Pixel convention: uint8 images are divided by 255; float images are taken as already scaled to [0, 1]. The
normalisation (``imagenet``, ``cifar``, ``none`` or explicit ``mean/std``) is applied after that scaling.
"""

from ._dataset import ImageDataset, calibration_subset, check_dataset
from ._formats import IMAGE_SUFFIXES, MAX_BYTES, load_dataset
from ._loader import NORMALIZATIONS, Loader, Normalization, augment_batch, make_loader, parse_normalize

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_BYTES",
    "NORMALIZATIONS",
    "ImageDataset",
    "Loader",
    "Normalization",
    "augment_batch",
    "calibration_subset",
    "check_dataset",
    "load_dataset",
    "make_loader",
    "parse_normalize",
]
