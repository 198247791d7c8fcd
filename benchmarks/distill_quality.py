"""Does ``compress distill`` beat the same number of random real images? CIFAR-10, K = 10 images per class.

Distil ``../shared`` CIFAR-10 ``train.npz`` (50,000 images) into 100 images by distribution matching
(:func:`compressor.distill_data.distill`), then train fresh ConvNets (:class:`compressor.distill_data.ConvNet`) with
the project's one Trainer, the same recipe for every training set:

* ``distilled``: the 100 distilled images, ``--runs`` trainings with different seeds;
* ``random``: 100 random real images (10 per class, :func:`compressor.data.calibration_subset`), a new subset and
  training seed per run;
* ``init``: the 100 real images the distillation started from (the distillation's own seed).

Top-1 on ``test1000.npz`` (1,000 test images: about +-1.5 points of sampling error per run at 30-50 %; all sets are
scored on the same images). Writes ``benchmarks/results/distill_quality.json``.

Usage::

    taskset -c 1 python -m benchmarks.distill_quality [--iterations 250] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from compressor.data import ImageDataset, calibration_subset, load_dataset, make_loader
from compressor.distill_data import ConvNet, distill, save_distilled
from compressor.evaluation import evaluate
from compressor.training import TrainConfig, Trainer

from ._child import write_json
from ._paths import RESULTS, TEST, TRAIN, missing


def train_and_score(train: ImageDataset, test: ImageDataset, *, seed: int, width: int, epochs: int, lr: float,
                    batch_size: int) -> float:
    """Top-1 on ``test`` of a fresh ConvNet trained on ``train`` (crop+flip, cifar normalisation, cosine SGD)."""
    torch.manual_seed(seed)
    model = ConvNet(10, width=width, input_shape=train.image_shape)
    loader = make_loader(train, batch_size=batch_size, normalize="cifar", shuffle=True, augment=True, seed=seed)
    Trainer(TrainConfig(epochs=epochs, lr=lr, seed=seed), device="cpu", progress=False).fit(model, loader)
    return evaluate(model, make_loader(test, batch_size=500, normalize="cifar"))


def summary(values: list[float]) -> dict[str, Any]:
    return {"top1": [round(v, 4) for v in values], "mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--embed-width", type=int, default=32)
    parser.add_argument("--batch-real", type=int, default=32)
    parser.add_argument("--eval-width", type=int, default=32)
    parser.add_argument("--eval-epochs", type=int, default=100)
    parser.add_argument("--eval-lr", type=float, default=0.01)
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-distilled", type=Path, default=None, help="also write the distilled .npz here")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_quality.json")
    args = parser.parse_args(argv)
    if missing(TRAIN, TEST):
        return 0
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    train, test = load_dataset(TRAIN), load_dataset(TEST)
    k = args.images_per_class
    result = distill(train, images_per_class=k, iterations=args.iterations, batch_real=args.batch_real,
                     width=args.embed_width, seed=args.seed)
    print(f"distilled in {result.report['seconds']:.0f} s: loss {result.report['loss_first']:.4g} -> "
          f"{result.report['loss_last_10_mean']:.4g}", file=sys.stderr, flush=True)
    if args.save_distilled is not None:
        save_distilled(result, args.save_distilled)
    init = distill(train, images_per_class=k, iterations=1, lr=1e-12, width=args.embed_width, seed=args.seed)
    recipe = dict(width=args.eval_width, epochs=args.eval_epochs, lr=args.eval_lr, batch_size=args.eval_batch)
    scores: dict[str, list[float]] = {"distilled": [], "random": [], "init": []}
    for run in range(args.runs):
        scores["distilled"].append(train_and_score(result.dataset(), test, seed=run, **recipe))
        scores["random"].append(train_and_score(calibration_subset(train, 10 * k, seed=100 + run), test, seed=run,
                                                **recipe))
        print(f"run {run}: distilled {scores['distilled'][-1]:.3f}  random {scores['random'][-1]:.3f}",
              file=sys.stderr, flush=True)
    scores["init"].append(train_and_score(init.dataset(), test, seed=0, **recipe))
    seconds = time.perf_counter() - start
    payload = {
        "command": "taskset -c 1 python -m benchmarks.distill_quality " + " ".join(argv if argv is not None
                                                                                    else sys.argv[1:]),
        "data": {"train": str(TRAIN.name), "test": str(TEST.name), "test_images": len(test)},
        "distillation": result.report,
        "evaluation_recipe": {"model": f"ConvNet-3 width {args.eval_width} (instance norm, avg pool)",
                              "trainer": "compressor.training.Trainer, SGD momentum 0.9 Nesterov, cosine, wd 5e-4",
                              "augment": "crop+flip", "normalize": "cifar", **recipe},
        "images": 10 * k,
        "results": {name: summary(values) for name, values in scores.items()},
        "threads": torch.get_num_threads(),
        "seconds_total": round(seconds, 1),
        "cpu_seconds_total": round(time.process_time() - cpu_start, 1),
    }
    write_json(args.out, payload)
    print(f"wrote {args.out} in {seconds:.0f} s: " + ", ".join(
        f"{n} {v['mean']:.3f}" for n, v in payload["results"].items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
