"""Scoring time of ``--method mipp`` on ResNet-20 and ResNet-56 for both estimators, and what they keep (issue 4).

For each model (``../shared``) and estimator (``predictor``, ``renyi``) the real scorer runs as ``compress(...,
method="mipp", target=0.33)`` builds it: the pipeline's defaults (filters metric, ``min_keep`` 0.1, ``round_to`` 8),
N = 256 CIFAR-10 training images (class-balanced, seed 0), ImageNet normalisation, at each thread count of
``--threads`` (torch's intra-op threads; the host has 2 cores, shared with other jobs, so the load average at the
start of every run is recorded next to its wall and CPU times). Recorded per run: seconds (capture, search, total,
and the process CPU time), search passes, the confidence ``x`` and t threshold used, the removed fraction, keep
counts per group, the Gram/pooled-map cache size, and top-1 on ``test1000.npz`` of the pruned model without
fine-tuning, raw and after re-estimating the BatchNorm statistics on 1,024 other training images (a fairer view of
which channels were kept). ``l1`` at the same budget and the unpruned model are the references; all accuracies are
on the same 1,000 images (about ±1.5 points of sampling error at these accuracies). Also the agreement between the
two estimators' kept channels (Jaccard index per group, mean).

Usage::

    python -m benchmarks.mipp_scoring                       # ~10 minutes on 2 busy cores
    python -m benchmarks.mipp_scoring --archs resnet20 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._child import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = {"resnet20": "models/cifar10-resnet/resnet20-12fca82f.th",
          "resnet56": "models/cifar10-resnet/resnet56-4bfd9763.th"}
TRAIN, TEST = SHARED / "data/cifar10/train.npz", SHARED / "data/cifar10/test1000.npz"


def _recalibrated(model: nn.Module, loader: Any) -> nn.Module:
    """A copy with BatchNorm statistics re-estimated on ``loader`` (the pipeline's ``--bn-recalib``)."""
    from compressor.evaluation import recalibrate_bn

    model = copy.deepcopy(model)
    recalibrate_bn(model, loader)
    return model.eval()


def _accuracy(model: nn.Module, groups: Any, scores: dict, keep: dict, loaders: dict) -> dict[str, float]:
    from compressor.pruning import engine
    from compressor.evaluation import evaluate

    example = torch.zeros(1, 3, 32, 32)
    pruned = copy.deepcopy(model)
    engine.apply_keep(pruned, engine.build_graph(pruned, example), groups, scores, keep)
    cpu = torch.device("cpu")
    return {"top1_no_ft": round(evaluate(pruned, loaders["test"], device=cpu), 4),
            "top1_bn_recalibrated": round(evaluate(_recalibrated(pruned, loaders["recal"]), loaders["test"],
                                                   device=cpu), 4)}


def run_one(arch: str, method: str, estimator: str | None, threads: int, args: argparse.Namespace,
            loaders: dict) -> dict[str, Any]:
    from compressor.io import load_model
    from compressor.methods.baselines import L1
    from compressor.methods.mipp import MIPP
    from compressor.methods.prune import ScoringContext
    from compressor.pruning import engine

    torch.set_num_threads(threads)
    model = load_model(SHARED / MODELS[arch], arch=arch).model.eval()
    example = torch.zeros(1, 3, 32, 32)
    graph = engine.build_graph(model, example)
    groups = engine.discover_groups(model, graph)
    ctx = ScoringContext(model=model, graph=graph, groups=groups, example_input=example, target=args.target,
                         metric="filters", device=torch.device("cpu"), seed=0, calib=loaders["calib"],
                         num_classes=10, round_to=args.round_to, min_keep=0.1)
    scorer = L1() if method == "l1" else MIPP.from_values({"estimator": estimator})
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    scored = scorer.score(ctx)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    keep = scored.keep or engine.allocate_uniform(model, example, groups, scored.scores, target=args.target,
                                                  metric="filters", min_keep=0.1, round_to=args.round_to).keep
    row: dict[str, Any] = {
        "arch": arch, "method": method, "estimator": estimator, "threads": threads,
        "load_average_1min": round(load, 2), "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
        "achieved": round(engine.removed_fraction(model, example, groups, scored.scores, keep, metric="filters"), 4),
        **_accuracy(model, groups, scored.scores, keep, loaders),
        "keep": {g.root: int(keep[g.root]) for g in groups},
        "kept": {g.root: sorted(torch.argsort(scored.scores[g.root], descending=True, stable=True)[: keep[g.root]]
                                .tolist()) for g in groups},
    }
    if method == "mipp":
        info = scored.report
        row.update({k: info[k] for k in ("confidence", "t_threshold", "search", "passes", "cap", "cache_mb")})
        row["seconds_parts"] = info["seconds"]
    print(f"{arch:9s} {method:5s} {estimator or '':9s} threads={threads} load={load:4.1f} {wall:7.1f}s "
          f"(cpu {cpu:6.1f}s) removed={row['achieved']:.3f} top1 {row['top1_no_ft']:.3f} / bn "
          f"{row['top1_bn_recalibrated']:.3f}" + (f" x={row['confidence']} passes={row['passes']}"
                                                   if method == "mipp" else ""), file=sys.stderr, flush=True)
    return row


def _jaccard(a: dict, b: dict) -> float:
    return statistics.fmean(len(set(a[k]) & set(b[k])) / len(set(a[k]) | set(b[k])) for k in a)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from compressor import data as data_mod
    from compressor.io import load_model
    from compressor.evaluation import evaluate

    train = data_mod.load_dataset(str(TRAIN))
    loaders = {
        "calib": data_mod.make_loader(data_mod.calibration_subset(train, args.samples, seed=0), batch_size=128,
                                      normalize="imagenet"),
        "recal": data_mod.make_loader(data_mod.calibration_subset(train, 1024, seed=123), batch_size=128,
                                      normalize="imagenet"),
        "test": data_mod.make_loader(data_mod.load_dataset(str(TEST)), batch_size=250, normalize="imagenet"),
    }
    rows, summary = [], {}
    for arch in args.archs:
        original = load_model(SHARED / MODELS[arch], arch=arch).model.eval()
        summary[arch] = {"top1_original": round(evaluate(original, loaders["test"], device=torch.device("cpu")), 4)}
        rows.append(run_one(arch, "l1", None, args.threads[0], args, loaders))
        for threads in args.threads:
            for estimator in args.estimators:
                rows.append(run_one(arch, "mipp", estimator, threads, args, loaders))
        mine = {r["estimator"]: r for r in rows if r["arch"] == arch and r["method"] == "mipp"
                and r["threads"] == args.threads[0]}
        if {"predictor", "renyi"} <= set(mine):
            summary[arch]["kept_jaccard_predictor_renyi"] = round(_jaccard(mine["predictor"]["kept"],
                                                                           mine["renyi"]["kept"]), 4)
        for r in rows:
            if r["arch"] == arch:
                key = r["method"] if r["method"] == "l1" else f"mipp_{r['estimator']}_t{r['threads']}"
                summary[arch][key] = {k: r[k] for k in ("seconds", "cpu_seconds", "achieved", "top1_no_ft",
                                                         "top1_bn_recalibrated") if k in r}
    return {
        "target": args.target, "metric": "filters", "round_to": args.round_to, "min_keep": 0.1,
        "samples": args.samples, "normalize": "imagenet", "threads": args.threads, "summary": summary,
        "rows": [{k: v for k, v in r.items() if k != "kept"} for r in rows],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=lambda s: s.split(","), default=["resnet20", "resnet56"])
    parser.add_argument("--estimators", type=lambda s: s.split(","), default=["predictor", "renyi"])
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[2, 1])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--target", type=float, default=0.33)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mipp_scoring.json")
    args = parser.parse_args(argv)
    for path in [TRAIN, TEST, *(SHARED / MODELS[a] for a in args.archs)]:
        if not path.exists():
            print(f"skipped: not found: {path} (the ../shared checkout)", file=sys.stderr)
            return 0
    result = run(args)
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
