"""Dataset distillation by Distribution Matching: a few synthetic images per class that stand in for a dataset.

Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023 (reference code: VICO-UoE/
DatasetCondensation, ``main_DM.py``). Every iteration samples a freshly initialised embedding network
:math:`\\psi_\\vartheta`, draws a batch of real images of every class, applies one differentiable Siamese augmentation
:math:`\\mathcal{A}_\\omega` per class with the *same* parameters :math:`\\omega` to the real and the synthetic
images of that class (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021), and
takes one SGD step on the synthetic images to reduce

.. math::
    L = \\sum_c \\Big\\| \\frac{1}{|B_c|} \\sum_{x \\in B_c} \\psi_\\vartheta(\\mathcal{A}_{\\omega_c}(x))
        - \\frac{1}{|S_c|} \\sum_{s \\in S_c} \\psi_\\vartheta(\\mathcal{A}_{\\omega_c}(s)) \\Big\\|^2,

the maximum mean discrepancy with a linear kernel between the real and synthetic embeddings of each class. Synthetic
images start as random real images of their class; the optimizer is SGD (lr 1, momentum 0.5), as in the paper.

The optimisation runs in standardised pixel space (per-channel mean and standard deviation of the data, as the
reference code's normalised tensors); :func:`distill` returns images in [0, 1] (the loaders' pixel space, where uint8
data is divided by 255), so the ``.npz`` it writes is read by every ``--data`` like the original data.

The embedding is the input of the network's last ``nn.Linear`` (the penultimate features; the reference's
``net.embed``). The default embedding network is the paper's ConvNet-3 (:class:`ConvNet`: 3 x [conv 3x3, instance
norm, ReLU, 2x2 average pool], width 128). BatchNorm networks run in training mode with all classes in one batch, as
the reference code's ``BN`` branch does.

Examples
--------
>>> result = distill("train.npz", images_per_class=10, iterations=500, seed=0)  # doctest: +SKIP
>>> save_distilled(result, "distilled.npz")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageDataset, load_dataset
from .errors import DataError, InputError, OutputError
from .io import atomic_save, check_writable_dir, load_model, resolve_arch
from .models import reinitialise

__all__ = ["CONVNET", "DSA_KINDS", "ConvNet", "DSAParams", "DistilledSet", "apply_dsa", "build_embedding",
           "channel_stats", "check_output", "distill", "distribution_matching_loss", "embed", "sample_dsa",
           "save_distilled"]

CONVNET = "convnet"
"""``arch`` name of the paper's ConvNet-3 embedding network (:class:`ConvNet`)."""
DSA_KINDS = ("color", "crop", "cutout", "flip", "scale", "rotate")
"""The reference's DSA strategy ``color_crop_cutout_flip_scale_rotate``: one of these is drawn per class and step."""


# ------------------------------------------------------------------------------------------------ the maths
def distribution_matching_loss(real: Sequence[torch.Tensor], synthetic: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-class squared distance between mean embeddings, summed over classes (MMD with a linear kernel).

    .. math::
        L = \\sum_{c=1}^{C} \\Big\\| \\tfrac{1}{|B_c|} \\textstyle\\sum_{x \\in B_c} \\psi(x)
        - \\tfrac{1}{|S_c|} \\sum_{s \\in S_c} \\psi(s) \\Big\\|_2^2

    Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023, eq. 4.

    Parameters
    ----------
    real, synthetic : sequence of torch.Tensor
        One ``(n, D)`` tensor of embeddings per class, the same classes in the same order (``n`` may differ).
    """
    if len(real) != len(synthetic) or not real:
        raise ValueError(f"expected embeddings of the same classes; got {len(real)} real, {len(synthetic)} synthetic")
    return torch.stack([((r.mean(0) - s.mean(0)) ** 2).sum() for r, s in zip(real, synthetic)]).sum()


def channel_stats(x: torch.Tensor, *, max_images: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of images in [0, 1] (uint8 input is divided by 255), estimated on at
    most ``max_images`` images taken at an even stride.

    Returns two ``(C,)`` float32 tensors; a constant channel gets std 1 so that standardising never divides by zero.
    """
    x = x[:: max(1, -(-len(x) // max_images))]
    pixels = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3))
    return mean, torch.where(std > 0, std, torch.ones_like(std))


@dataclass(frozen=True)
class DSAParams:
    """One draw of a differentiable Siamese augmentation: the transform and its parameters, shared by a batch.

    ``kind`` is one of :data:`DSA_KINDS`; ``values``: color ``(brightness, saturation, contrast)`` draws in [0, 1);
    crop ``(dy, dx)`` shifts in pixels; cutout ``(cy, cx)`` centre of the square; flip ``(flip,)`` 1 or 0; scale
    ``(sy, sx)``; rotate ``(radians,)``.
    """

    kind: str
    values: tuple[float, ...]


def sample_dsa(generator: torch.Generator, *, height: int, width: int, kinds: Sequence[str] = DSA_KINDS,
               crop_ratio: float = 0.125, scale_ratio: float = 1.2, rotate_degrees: float = 15.0,
               cutout_ratio: float = 0.5) -> DSAParams:
    """Draw one transform and its parameters, as the reference's ``DiffAugment`` in mode ``'S'`` with a seed.

    The transform is uniform over ``kinds``; crop shifts are uniform integers in
    :math:`[-\\lfloor r H + 0.5 \\rfloor, \\lfloor r H + 0.5 \\rfloor]` (r = ``crop_ratio``), scales uniform in
    :math:`[1/s, s]` (s = ``scale_ratio``), rotations uniform in :math:`[-\\theta, \\theta]`, the cutout centre
    uniform over the image, the flip a fair coin. Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
    Augmentation", ICML 2021, section 3.2 (parameters of the reference code's ``ParamDiffAug``).
    """
    def uniform(n: int) -> list[float]:
        return torch.rand(n, generator=generator).tolist()

    kind = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
    if kind == "color":
        values: tuple[float, ...] = tuple(uniform(3))
    elif kind == "crop":
        sy, sx = int(height * crop_ratio + 0.5), int(width * crop_ratio + 0.5)
        values = (float(torch.randint(-sy, sy + 1, (1,), generator=generator)),
                  float(torch.randint(-sx, sx + 1, (1,), generator=generator)))
    elif kind == "cutout":
        values = (float(torch.randint(height, (1,), generator=generator)),
                  float(torch.randint(width, (1,), generator=generator)), cutout_ratio)
    elif kind == "flip":
        values = (float(uniform(1)[0] < 0.5),)
    elif kind == "scale":
        values = tuple(u * (scale_ratio - 1.0 / scale_ratio) + 1.0 / scale_ratio for u in uniform(2))
    elif kind == "rotate":
        values = ((uniform(1)[0] - 0.5) * 2.0 * math.radians(rotate_degrees),)
    else:
        raise ValueError(f"unknown DSA transform {kind!r}; expected one of {', '.join(DSA_KINDS)}")
    return DSAParams(kind, values)


def apply_dsa(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    """Apply one drawn transform to every image of the NCHW batch ``x``, differentiably with respect to ``x``.

    color: :math:`x \\leftarrow x + (b - \\tfrac12)`, then saturation :math:`(x - \\bar{x}_{pixel}) \\cdot 2s +
    \\bar{x}_{pixel}`, then contrast :math:`(x - \\bar{x}_{image}) (c + \\tfrac12) + \\bar{x}_{image}`; crop: a
    translation with zero fill; cutout: a zeroed square of side ``ratio * H``; flip: horizontal; scale and rotate:
    bilinear resampling of an affine grid with zero padding. Same transforms and constants as the reference code's
    ``DiffAugment`` (Zhao & Bilen, ICML 2021).
    """
    v = params.values
    n, _, h, w = x.shape
    if params.kind == "color":
        x = x + (v[0] - 0.5)
        x = (x - x.mean(dim=1, keepdim=True)) * (2.0 * v[1]) + x.mean(dim=1, keepdim=True)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (v[2] + 0.5) + mean
    if params.kind == "crop":
        dy, dx = int(v[0]), int(v[1])
        py, px = abs(dy), abs(dx)
        padded = F.pad(x, (px, px, py, py))
        return padded[:, :, py + dy: py + dy + h, px + dx: px + dx + w]
    if params.kind == "cutout":
        side_y, side_x = int(h * v[2] + 0.5), int(w * v[2] + 0.5)
        rows = torch.arange(h, device=x.device) - (int(v[0]) - side_y // 2)
        cols = torch.arange(w, device=x.device) - (int(v[1]) - side_x // 2)
        hole = ((rows >= 0) & (rows < side_y))[:, None] & ((cols >= 0) & (cols < side_x))[None, :]
        return x * (~hole).to(x.dtype)
    if params.kind == "flip":
        return x.flip(3) if v[0] else x
    if params.kind in ("scale", "rotate"):
        if params.kind == "scale":
            theta = [[v[1], 0.0, 0.0], [0.0, v[0], 0.0]]
        else:
            cos, sin = math.cos(v[0]), math.sin(v[0])
            theta = [[cos, -sin, 0.0], [sin, cos, 0.0]]
        grid = F.affine_grid(torch.tensor([theta], dtype=x.dtype, device=x.device).expand(n, 2, 3), list(x.shape),
                             align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)
    raise ValueError(f"unknown DSA transform {params.kind!r}")


# --------------------------------------------------------------------------------------- embedding networks
class ConvNet(nn.Module):
    """The ConvNet of the dataset-condensation papers: ``depth`` x [conv 3x3 (``width``), instance norm (GroupNorm
    with one group per channel, affine), ReLU, 2x2 average pool], then one linear classifier on the flattened map.

    Gidaris & Komodakis (2018)'s design, as used by Zhao & Bilen (ICLR 2021, ICML 2021, WACV 2023) with
    ``width=128, depth=3`` (``ConvNet`` in the reference code's ``networks.py``).
    """

    def __init__(self, num_classes: int = 10, *, width: int = 128, depth: int = 3,
                 input_shape: tuple[int, int, int] = (3, 32, 32)) -> None:
        super().__init__()
        channels, h, w = input_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            channels, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise InputError(f"a {depth}-block ConvNet needs images of at least {2 ** depth}x{2 ** depth} pixels")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s last ``nn.Linear`` for the batch ``x``, flattened to ``(N, D)``: its penultimate
    features, the embedding of distribution matching (the reference code's ``net.embed``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError(f"{type(model).__name__} has no nn.Linear classifier to take embeddings from; use "
                         f"--arch {CONVNET} or a network that ends in a linear layer")
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[-1].reshape(len(x), -1)


def build_embedding(*, model: str | os.PathLike[str] | None = None, arch: str | None = None, num_classes: int,
                    input_shape: tuple[int, int, int], trust_pickle: bool = False, width: int = 128) -> nn.Module:
    """The network whose random re-initialisations embed the images: ``model`` (a checkpoint the tool loads; only its
    architecture is used), else ``arch`` (a built-in name, ``file.py:fn`` or ``module:fn``), else :class:`ConvNet`
    (``arch`` None or ``"convnet"``, with ``width``)."""
    if model is not None:
        net = load_model(model, arch=arch, trust_pickle=trust_pickle).model
    elif arch is None or arch == CONVNET:
        if not isinstance(width, int) or width < 1:
            raise InputError(f"--width must be a positive integer; got {width!r}")
        net = ConvNet(num_classes, width=width, input_shape=input_shape)
    else:
        factory, _ = resolve_arch(arch)
        net = factory(num_classes=num_classes) if ":" not in arch else factory()
        if not isinstance(net, nn.Module):
            raise InputError(f"--arch {arch} returned {type(net).__name__}, not a torch.nn.Module")
    try:
        with torch.no_grad():
            embed(net.train(), torch.zeros((2, *input_shape)))
    except RuntimeError as exc:
        raise DataError(f"the embedding network cannot take {'x'.join(map(str, input_shape))} images: "
                        f"{str(exc).splitlines()[0]}") from None
    return net


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class DistilledSet:
    """What :func:`distill` returns: ``x`` float32 NCHW images in [0, 1], ``y`` int64 labels (``images_per_class``
    per class, class by class), and a ``report`` (settings, loss at the start and the end, seconds)."""

    x: torch.Tensor
    y: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)

    def dataset(self) -> ImageDataset:
        """The distilled images as an :class:`~compressor.data.ImageDataset` (what loading the saved file gives)."""
        return ImageDataset(self.x, self.y, source="<distilled>")


def _check_settings(images_per_class: int, iterations: int, batch_real: int, lr: float) -> None:
    for value, flag in ((images_per_class, "--images-per-class"), (iterations, "--iterations"),
                        (batch_real, "--batch-real")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{flag} must be a positive integer; got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"--lr must be a positive number; got {lr!r}")


def _class_index(dataset: ImageDataset, images_per_class: int) -> tuple[list[int], list[torch.Tensor]]:
    classes, counts = torch.unique(dataset.y, return_counts=True)
    small = [(int(c), int(n)) for c, n in zip(classes, counts) if n < images_per_class]
    if small:
        raise DataError(f"--images-per-class {images_per_class}: class {small[0][0]} of {dataset.source} has only "
                        f"{small[0][1]} images (synthetic images start as real ones); lower --images-per-class")
    return classes.tolist(), [torch.nonzero(dataset.y == c).flatten() for c in classes.tolist()]


def _matching_loss(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                   generator: torch.Generator | None, size: tuple[int, int]) -> torch.Tensor:
    """One DM objective: per class, the same augmentation on its real and synthetic batch; every class in one forward
    (real without gradients), as the reference code's BatchNorm branch."""
    reals, syns = [], []
    for r, s in batches:
        if generator is not None:
            drawn = sample_dsa(generator, height=size[0], width=size[1])
            r, s = apply_dsa(r, drawn), apply_dsa(s, drawn)
        reals.append(r)
        syns.append(s)
    with torch.no_grad():
        real_emb = torch.split(embed(net, torch.cat(reals)), [len(r) for r in reals])
    syn_emb = torch.split(embed(net, torch.cat(syns)), [len(s) for s in syns])
    return distribution_matching_loss(real_emb, syn_emb)


def distill(data: str | os.PathLike[str] | ImageDataset, *, images_per_class: int, model: Any = None,
            arch: str | None = None, iterations: int = 1000, batch_real: int = 64, lr: float = 1.0,
            momentum: float = 0.5, dsa: bool = True, width: int = 128, seed: int = 0, trust_pickle: bool = False,
            progress: Callable[[int, float], None] | None = None) -> DistilledSet:
    """Distil ``data`` into ``images_per_class`` synthetic images per class by distribution matching.

    Parameters
    ----------
    data : path spec or ImageDataset
        Any ``--data`` format (:func:`compressor.data.load_dataset`).
    images_per_class : int
        K, synthetic images per class (>= 1, at most the smallest class's count).
    model, arch, width, trust_pickle
        The embedding network (:func:`build_embedding`); re-initialised at random every iteration.
    iterations : int
        SGD steps on the synthetic images (the paper runs 20,000; a few hundred already beat random real images).
    batch_real : int
        Real images per class and iteration (the paper: 256).
    lr, momentum : float
        SGD on the images (the paper: 1.0 and 0.5).
    dsa : bool
        Differentiable Siamese augmentation (:func:`sample_dsa`, :func:`apply_dsa`).
    seed : int
        Seeds the initial images, the real batches, the augmentations and the embedding networks.
    progress : callable, optional
        Called as ``progress(iteration, loss)`` after each step (1-based).
    """
    _check_settings(images_per_class, iterations, batch_real, lr)
    dataset = data if isinstance(data, ImageDataset) else load_dataset(data)
    classes, index = _class_index(dataset, images_per_class)
    shape = dataset.image_shape
    template = build_embedding(model=model, arch=arch, num_classes=max(classes) + 1, input_shape=shape,
                               trust_pickle=trust_pickle, width=width)
    for p in template.parameters():
        p.requires_grad_(False)
    mean, std = (t.view(1, -1, 1, 1) for t in channel_stats(dataset.x))

    def real(idx: torch.Tensor) -> torch.Tensor:
        x = dataset.x[idx]
        return ((x.float() / 255.0 if x.dtype == torch.uint8 else x.float()) - mean) / std

    gen = torch.Generator().manual_seed(seed)
    start = [ix[torch.randperm(len(ix), generator=gen)[:images_per_class]] for ix in index]
    synthetic = torch.cat([real(ix) for ix in start]).requires_grad_(True)
    optimizer = torch.optim.SGD([synthetic], lr=lr, momentum=momentum)
    losses, t0 = [], time.perf_counter()
    for it in range(1, iterations + 1):
        net = reinitialise(template, seed=seed * 1_000_003 + it).train()
        batches = [(real(ix[torch.randperm(len(ix), generator=gen)[:batch_real]]),
                    synthetic[c * images_per_class:(c + 1) * images_per_class]) for c, ix in enumerate(index)]
        loss = _matching_loss(net, batches, generator=gen if dsa else None, size=shape[1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(it, losses[-1])
    x = (synthetic.detach() * std + mean).clamp_(0.0, 1.0).contiguous()
    y = torch.tensor(classes, dtype=torch.int64).repeat_interleave(images_per_class)
    report = {"algorithm": "distribution matching (Zhao & Bilen, WACV 2023)", "source": dataset.source,
              "real_images": len(dataset), "images_per_class": images_per_class, "classes": len(classes),
              "embedding": type(template).__name__, "iterations": iterations, "batch_real": batch_real, "lr": lr,
              "momentum": momentum, "dsa": dsa, "seed": seed, "loss_first": losses[0], "loss_last": losses[-1],
              "loss_last_10_mean": float(np.mean(losses[-10:])), "seconds": round(time.perf_counter() - t0, 2)}
    return DistilledSet(x, y, report)


def check_output(out: str | os.PathLike[str], *, inputs: Sequence[str | os.PathLike[str]] = (),
                 overwrite: bool = False) -> Path:
    """Refuse an output that is not a ``.npz`` path, exists (without ``overwrite``) or is one of ``inputs``."""
    path = Path(out)
    if path.suffix.lower() != ".npz":
        raise OutputError(f"--out {out}: the distilled set is written as .npz; give a path such as distilled.npz")
    if path.is_dir():
        raise OutputError(f"--out {out} is a directory; give a file path such as {path / 'distilled.npz'}")
    if any(Path(p).exists() and path.resolve() == Path(p).resolve() for p in inputs):
        raise OutputError(f"--out {out} would overwrite an input; choose another path")
    if path.exists() and not overwrite:
        raise OutputError(f"--out {out} exists; choose a new path or pass --overwrite")
    check_writable_dir(path.parent)
    return path


def save_distilled(result: DistilledSet, out: str | os.PathLike[str]) -> Path:
    """Write ``x`` (float32 NCHW in [0, 1]) and ``y`` (int64) to ``out`` (``.npz``) atomically: a failed write leaves
    no file."""
    x, y = result.x.numpy().astype(np.float32), result.y.numpy().astype(np.int64)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:  # a file object: np.savez would append .npz to the temp name
            np.savez(fh, x=x, y=y)

    return atomic_save(write, Path(out))
