"""Does channel alignment (``--round-to K``) change onnxruntime CPU latency of a pruned model?

For each K, prune ResNet-56 (``../shared``) with ``l1`` at the same target, then benchmark the original and the
pruned ONNX graphs interleaved in one run, and record the speedup (original p50 / pruned p50) at batch 1 and 32.
The ratio, not the absolute time, is what compares across K: each K's run has its own baseline.

Usage::

    python -m benchmarks.round_to [--model ../shared/models/cifar10-resnet/resnet56-4bfd9763.th] [--target 0.33]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compressor import compress
from compressor.errors import CompressorError

from ._child import write_json

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared/models/cifar10-resnet/resnet56-4bfd9763.th"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--target", type=float, default=0.33)
    parser.add_argument("--round-to", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "round_to.json")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"skipped: model not found: {args.model} (pass --model)", file=sys.stderr)
        return 0
    rows = []
    for k in (int(v) for v in args.round_to.split(",")):
        try:
            result = compress(args.model, arch=args.arch, method="l1", target=args.target, round_to=k, epochs=0,
                              bench_batches=(1, 32), bench_repeats=args.repeats, threads=args.threads)
        except CompressorError as exc:
            rows.append({"round_to": k, "error": str(exc)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        r = result.report
        row = {"round_to": k, "achieved": r["method"]["achieved"],
               "macs_ratio": r["compressed"]["macs"] / r["original"]["macs"],
               **{f"speedup_b{b}": r["latency"][str(b)]["speedup"] for b in (1, 32)},
               **{f"p50_ms_b{b}_{w}": r["latency"][str(b)][w]["p50_ms"] for b in (1, 32)
                  for w in ("original", "compressed")}}
        row["efficiency_b32"] = row["speedup_b32"] * row["macs_ratio"]  # speedup / MAC reduction factor
        rows.append(row)
        print(json.dumps(row), flush=True)
    payload = {"model": str(args.model), "target": args.target, "threads": args.threads, "rows": rows,
               "benchmark": result.report["benchmark"], "versions": result.report["versions"],
               "machine": result.report["machine"]}
    write_json(args.out, payload, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
