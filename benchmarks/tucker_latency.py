"""Tucker-2 vs channel pruning at the same parameter budget: params, MACs, top-1, parity and onnxruntime latency.

For each method (``tucker``, ``tucker`` with ``--latency-aware``, ``l1``, ``l1+tucker`` by default) compress
ResNet-56 (``../shared``) to the same ``--target`` of *parameters*, without fine-tuning unless ``--epochs`` is given,
and record what the report measured: params and MACs before/after, top-1 on ``--eval-data`` before and after,
ONNX parity, and the interleaved onnxruntime latency (original vs compressed, so the speedup is a ratio measured in
one run). Small 3x3 convolutions often get *slower* on CPU when factorised (three kernels and two extra activations
instead of one kernel); ``--latency-aware`` keeps only the factorisations measured to pay off.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.tucker_latency [--target 0.33] [--threads 1] [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from compressor import compress
from compressor.errors import CompressorError

from ._child import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models/cifar10-resnet/resnet56-4bfd9763.th"
DEFAULT_EVAL = SHARED / "data/cifar10/test1000.npz"
RUNS = {
    "tucker": ("tucker", {}),
    "tucker-latency-aware": ("tucker", {"tucker_latency_aware": True}),
    "l1": ("l1", {}),
    "l1+tucker": ("l1+tucker", {}),
}


def _row(name: str, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    tucker = report["method"].get("tucker", {})
    return {
        "run": name, "method": report["method"]["name"], "achieved": round(report["method"]["achieved"], 4),
        "params": [report["original"]["params"], report["compressed"]["params"]],
        "macs": [report["original"]["macs"], report["compressed"]["macs"]],
        "top1": [report["original"]["accuracy"], report["compressed"]["accuracy_before_finetune"],
                 report["compressed"]["accuracy"]],
        "parity_max_abs_diff": report["parity"]["max_abs_diff"],
        "latency_p50_ms": {b: [v["original"]["p50_ms"], v["compressed"]["p50_ms"]]
                           for b, v in report["latency"].items()},
        "speedup": {b: v["speedup"] for b, v in report["latency"].items()},
        "factorised_layers": len(tucker.get("layers", {})), "ranks": {n: f["ranks"] for n, f in
                                                                      tucker.get("layers", {}).items()},
        "tucker_note": tucker.get("note"), "round_to": report["options"]["round_to"], "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL)
    parser.add_argument("--data", type=Path, default=None, help="training data (needed with --epochs)")
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.33)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tucker_latency.json")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"skipped: model not found: {args.model} (pass --model)", file=sys.stderr)
        return 0
    rows = []
    for name in args.runs.split(","):
        method, options = RUNS[name]
        start = time.perf_counter()
        try:
            result = compress(args.model, arch=args.arch, data=args.data, eval_data=args.eval_data,
                              normalize="imagenet", method=method, target=args.target, target_metric="params",
                              epochs=args.epochs, method_options=options, bench_batches=(1, 32),
                              bench_repeats=args.repeats, threads=args.threads)
        except CompressorError as exc:
            rows.append({"run": name, "error": str(exc)})
            print(f"{name}: {exc}", file=sys.stderr)
            continue
        rows.append(_row(name, result.report, time.perf_counter() - start))
        row = rows[-1]
        print(f"{name}: achieved {row['achieved']:.4f} params {row['params'][1]} macs {row['macs'][1]} "
              f"top1 {row['top1']} speedup {row['speedup']}", file=sys.stderr)
    write_json(args.out, {"target": args.target, "epochs": args.epochs, "threads": args.threads,
                          "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
