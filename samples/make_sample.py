"""Make the bundled sample: a procedurally generated shapes dataset and a ``samplenet`` trained on it.

Fully offline and deterministic (seeded NumPy and torch, CPU only). Run from the repository root::

    python samples/make_sample.py

It writes, next to this file:

* ``shapes_train_set.npz`` and ``shapes_test_set.npz``: ``x`` uint8 ``(N, 32, 32, 3)`` (NHWC, RGB) and ``y`` int64
  ``(N,)``;
* ``samplenet.pt``: ``{'state_dict', 'arch': 'samplenet', 'normalize': '0.5,0.5,0.5/0.5,0.5,0.5', 'accuracy'}``,
  loadable with ``torch.load(path, weights_only=True)``.

The model sees ``x / 255`` normalised with mean 0.5 and std 0.5 per channel, i.e. ``--normalize
0.5,0.5,0.5/0.5,0.5,0.5`` on the command line.

Each image is one of ten classes drawn at a random position, scale, rotation and colour pair (foreground on
background), over a banded two-colour background gradient, with sparse pixel noise and thin distractor lines. The
contrast is sometimes low and the object sometimes small, so a small CNN gets roughly 90% rather than 100%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    from compressor.models import create_model
except ImportError:  # run as a plain script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compressor.models import create_model

CLASSES = (
    "disk",
    "ring",
    "square",
    "triangle",
    "plus",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
)
NORMALIZE = "0.5,0.5,0.5/0.5,0.5,0.5"
SIZE, SUPER = 32, 2  # output size; supersampling factor for anti-aliasing
_BANDS = 6  # steps of the background gradient

# Class -> (base rotation in degrees, rotation jitter in degrees); None = any rotation.
_ROTATION: dict[str, tuple[float, float] | None] = {
    "disk": None,
    "ring": None,
    "square": None,
    "triangle": None,
    "plus": (0.0, 12.0),
    "cross": (45.0, 12.0),
    "horizontal_stripes": (0.0, 12.0),
    "vertical_stripes": (90.0, 12.0),
    "diagonal_stripes": (45.0, 12.0),  # 45 or 135, chosen at random
    "checkerboard": (0.0, 12.0),
}


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ``kind`` in object coordinates ``(u, v)`` (object radius 1, already rotated)."""
    r = np.hypot(u, v)
    if kind == "disk":
        return r <= 1.0
    if kind == "ring":
        return (r <= 1.0) & (r >= rng.uniform(0.45, 0.7))
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == "triangle":
        # Equilateral triangle with circumradius 1: three half-planes at 120 degrees.
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.all([u * np.cos(a) + v * np.sin(a) >= -0.5 for a in angles], axis=0)
    if kind in ("plus", "cross"):
        w = rng.uniform(0.18, 0.32)
        return ((np.abs(u) <= w) | (np.abs(v) <= w)) & (np.maximum(np.abs(u), np.abs(v)) <= 1.0)
    period = rng.uniform(0.45, 0.75)  # in object radii, so 2-4 stripes across the patch
    patch = np.maximum(np.abs(u), np.abs(v)) <= 1.0 if rng.random() < 0.5 else r <= 1.0
    if kind.endswith("_stripes"):
        return patch & (np.sin(2 * np.pi * v / period) > 0)
    if kind == "checkerboard":
        return patch & (np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period) > 0)
    raise ValueError(f"unknown shape {kind!r}")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground colour and two background colours; the contrast is sometimes low on purpose."""
    bg0 = rng.uniform(0, 255, 3)
    bg1 = np.clip(bg0 + rng.normal(0, 40, 3), 0, 255)
    contrast = rng.uniform(25, 160)  # mean distance of the foreground from the background, per channel
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-8
    fg = bg0 + contrast * np.sqrt(3) * direction
    # Reflect out-of-range channels back so the contrast survives clipping.
    fg = np.where(fg > 255, 2 * bg0 - fg, fg)
    return np.clip(fg, 0, 255), bg0, bg1


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(32, 32, 3)`` uint8 image of class ``label``."""
    kind = CLASSES[label]
    n = SIZE * SUPER
    coords = (np.arange(n) + 0.5) / SUPER  # pixel units
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    radius = rng.uniform(5.0, 12.0)
    cy, cx = rng.uniform(radius * 0.7, SIZE - radius * 0.7, 2)
    rotation = _ROTATION[kind]
    if rotation is None:
        theta = rng.uniform(0, 360)
    else:
        base = rotation[0] + (90.0 if kind == "diagonal_stripes" and rng.random() < 0.5 else 0.0)
        theta = base + rng.uniform(-rotation[1], rotation[1])
    t = np.deg2rad(theta)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
    mask = _shape_mask(kind, u, v, rng)
    fg, bg0, bg1 = _colours(rng)
    ramp_angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ramp_angle) * xx + np.sin(ramp_angle) * yy) / (SIZE * np.sqrt(2)) + 0.5
    # Banded rather than smooth: a smooth ramp makes every pixel distinct and triples the compressed size.
    ramp = np.floor(np.clip(ramp, 0.0, 0.999) * _BANDS) / (_BANDS - 1)
    img = bg0 + (bg1 - bg0) * ramp[..., None]
    img = np.where(mask[..., None], fg, img)
    img = img.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3))
    _add_clutter(img, rng)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _add_clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """In place: a few thin straight distractor lines and sparse salt-and-pepper-like colour noise."""
    for _ in range(rng.integers(0, 3)):
        colour = rng.uniform(0, 255, 3)
        y0, x0, y1, x1 = rng.uniform(0, SIZE - 1, 4)
        steps = np.linspace(0, 1, 48)
        ys = np.rint(y0 + (y1 - y0) * steps).astype(int)
        xs = np.rint(x0 + (x1 - x0) * steps).astype(int)
        img[ys, xs] = colour
    noisy = rng.random((SIZE, SIZE)) < rng.uniform(0.0, 0.12)
    img[noisy] = rng.uniform(0, 255, (int(noisy.sum()), 3))


def make_dataset(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each class, shuffled: ``x`` uint8 ``(N, 32, 32, 3)``, ``y`` int64 ``(N,)``."""
    y = np.repeat(np.arange(len(CLASSES), dtype=np.int64), per_class)
    rng.shuffle(y)
    x = np.stack([render(int(label), rng) for label in y])
    return x, y


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, scaled to [0, 1] and normalised with mean 0.5 / std 0.5."""
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def _augment(xb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 2-pixel translation (reflect padding); labels are invariant to both."""
    flip = torch.rand(xb.shape[0], generator=generator) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
    dy, dx = (int(d) for d in torch.randint(0, 5, (2,), generator=generator))
    padded = F.pad(xb, (2, 2, 2, 2), mode="reflect")
    return padded[:, :, dy : dy + SIZE, dx : dx + SIZE]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 250) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int) -> None:
    """AdamW with a one-cycle learning rate, batch 64, light augmentation."""
    generator = torch.Generator().manual_seed(seed)
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(_augment(x[idx], generator)), y[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.3f}  ({elapsed:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=("samplenet", "samplenet_wide"), default="samplenet",
                        help="the model to train; writes <arch>.pt (the data is the same for both)")
    # One thread by default: the result does not depend on the core count, and on a busy machine two OpenMP
    # threads can be ten times slower than one (each barrier waits for the thread that got descheduled).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    x_train, y_train = make_dataset(args.train_per_class, rng)
    x_test, y_test = make_dataset(args.test_per_class, rng)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out_dir / "shapes_train_set.npz", x=x_train, y=y_train)
    np.savez_compressed(args.out_dir / "shapes_test_set.npz", x=x_test, y=y_test)
    print(f"data: {len(y_train)} train, {len(y_test)} test images ({time.perf_counter() - start:.1f} s)")

    model = create_model(args.arch, num_classes=len(CLASSES))
    xt, yt = to_tensor(x_train), torch.from_numpy(y_train)
    train(model, xt, yt, epochs=args.epochs, seed=args.seed)
    accuracy = evaluate(model, to_tensor(x_test), torch.from_numpy(y_test))
    train_accuracy = evaluate(model, xt, yt)
    checkpoint = {"state_dict": model.state_dict(), "arch": args.arch, "normalize": NORMALIZE, "accuracy": accuracy}
    torch.save(checkpoint, args.out_dir / f"{args.arch}.pt")
    print(f"{args.arch}: train accuracy {train_accuracy:.1f}%, test accuracy {accuracy:.1f}%")
    print(f"done in {time.perf_counter() - start:.1f} s; wrote {args.out_dir}")


if __name__ == "__main__":
    main()
