"""Every ``--method cmi`` formulation, cutoff and direction on ResNet-56: does each run, and what does it choose?

Issue 3's acceptance run: ``compress <ResNet-56> --arch resnet56 --data train.npz --eval-data test1000.npz
--normalize imagenet --method cmi --target 0.33`` with each ``--cmi-condition`` (layer, full, compact), each
``--cmi-cutoff`` (target, scree, permutation) and each ``--cmi-direction`` (forward, bidirectional), through the
public API with ``--epochs 0`` (no fine-tuning: the numbers compare the selections, not a training recipe). Per run
it records the filters removed, params and MACs kept, top-1 on ``test1000.npz`` right after pruning and after the
pipeline's BatchNorm recalibration (1,024 training images; no fine-tuning; ±0.9 points sampling error at 1,000
images, the same images for every row), the scoring time and the per-group keep counts. ``scree`` and ``permutation``
choose their own budget, so ``--target`` does not bind them. ONNX parity is checked by the pipeline for every row;
the latency benchmark is skipped.

Usage::

    python -m benchmarks.cmi_variants [--quick] [--out benchmarks/results/cmi_variants.json]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

from ._child import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models/cifar10-resnet/resnet56-4bfd9763.th"
TRAIN = SHARED / "data/cifar10/train.npz"
TEST = SHARED / "data/cifar10/test1000.npz"
CONDITIONS = ("layer", "full", "compact")
CUTOFFS = ("target", "scree", "permutation")
DIRECTIONS = ("forward", "bidirectional")


def variants(quick: bool) -> list[dict[str, str]]:
    """All 18 combinations, or (``--quick``) each value of each option once."""
    if quick:
        return [{"cmi_condition": c, "cmi_cutoff": k, "cmi_direction": d}
                for c, k, d in zip(CONDITIONS, CUTOFFS, DIRECTIONS + ("forward",))]
    return [{"cmi_condition": c, "cmi_cutoff": k, "cmi_direction": d}
            for c, k, d in itertools.product(CONDITIONS, CUTOFFS, DIRECTIONS)]


def run_one(options: dict[str, str], target: float) -> dict:
    from compressor import compress
    from compressor.errors import CompressorError

    start = time.perf_counter()
    try:
        result = compress(str(MODEL), arch="resnet56", data=str(TRAIN), eval_data=str(TEST), normalize="imagenet",
                          method="cmi", target=target, bench_batches=(), method_options=dict(options))
    except CompressorError as exc:
        return {**options, "error": str(exc), "seconds": round(time.perf_counter() - start, 1)}
    r = result.report
    o, c, info = r["original"], r["compressed"], r["method"]
    return {
        **options,
        "filters_removed": round(1 - c["filters"] / o["filters"], 4),
        "params_kept": round(c["params"] / o["params"], 4),
        "macs_kept": round(c["macs"] / o["macs"], 4),
        "top1_original": o["accuracy"],
        "top1_pruned": c["accuracy_before_bn_recalib"],
        "top1_bn_recalibrated": c["accuracy"],
        "scoring_seconds": info["scoring_seconds"],
        "parity_max_abs_diff": r["parity"]["max_abs_diff"],
        "keep": info["cmi"]["keep"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs covering every value instead of all 18")
    parser.add_argument("--target", type=float, default=0.33)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cmi_variants.json")
    args = parser.parse_args(argv)
    missing = [p for p in (MODEL, TRAIN, TEST) if not p.exists()]
    if missing:
        print(f"skipped: needs {missing[0]} (the ../shared checkout beside the repo)", file=sys.stderr)
        return 0
    rows = []
    for options in variants(args.quick):
        row = run_one(options, args.target)
        rows.append(row)
        shown = row.get("error") or (f"filters -{row['filters_removed']:.1%}, top-1 {row['top1_pruned']:.1%} "
                                     f"(BN recalibrated {row['top1_bn_recalibrated']:.1%}), "
                                     f"scoring {row['scoring_seconds']:.1f}s")
        print(f"{options['cmi_condition']:8} {options['cmi_cutoff']:12} {options['cmi_direction']:14} {shown}",
              flush=True)
    payload = {"command": "python -m benchmarks.cmi_variants" + (" --quick" if args.quick else ""),
               "model": str(MODEL.name), "target": args.target, "cpu_count": os.cpu_count(), "rows": rows}
    write_json(args.out, payload)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
