"""What limits ResNet-56's INT8 speed-up at batch 1: channel width or depth?

Issue 12's ResNet-56 targets (INT8 compressed >= 3x the fp32 original and >= 1.5x the INT8 original, batch 1, at a
third of the filters) were missed by the ``deploy`` suite. This script separates the two things latency depends on
for a 32x32 CIFAR network on one thread: the work per layer (channel widths, which pruning reduces) and the number of
layers (a fixed cost per onnxruntime node, which channel pruning never removes).

In **one** interleaved onnxruntime call per precision (:class:`compressor.widths.OnnxLatency`: every graph exported,
INT8 graphs quantised in the run's default format, all timed alternately on ``--threads`` at batch 1), it times:

* the trained ResNet-56 (the reference) and the trained ResNet-20/32/44 of ``../shared`` (same widths 16/32/64, 3/5/7
  blocks per stage instead of 9): what removing depth alone would give;
* ResNet-56 pruned by ``l1`` (``--epochs 0``, no reconstruction: latency does not depend on the weights) at growing
  fractions of the filters, up to what the method reaches: the speed-up channel pruning alone can give, i.e. the
  asymptote it runs into;
* ResNet-56 depth-pruned by ``blocks`` (whole residual blocks removed) at a third and half of the filters.

Per graph it records p50, MACs, node count, and the ratio to ResNet-56 in the same precision and to the fp32
ResNet-56. Random calibration images: latency depends on the graph, not on the calibrated ranges.

Usage::

    python -m benchmarks.int8_floor [--threads 1] [--repeats 100] [--targets 0.33,0.5,0.67,0.8,0.9] [--round-to 8]
        [--blocks-targets 0.33,0.5]

Writes ``benchmarks/results/int8_floor.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from compressor import compress
from compressor.errors import CompressorError
from compressor.io import load_model
from compressor.pipeline import sizes
from compressor.report import machine, versions
from compressor.widths import OnnxLatency

from ._child import write_json
from ._paths import RESULTS, SHARED, TEST, TRAIN, missing

DEPTHS = {f"resnet{n}": SHARED / f"models/cifar10-resnet/{name}" for n, name in
          ((20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th"), (44, "resnet44-014dd654.th"),
           (56, "resnet56-4bfd9763.th"))}


def pruned(target: float, round_to: int, threads: int, method: str = "l1") -> torch.nn.Module | str:
    """ResNet-56 with ``target`` of its filters removed by ``method`` (no fine-tuning), or the error's message."""
    try:
        result = compress(str(DEPTHS["resnet56"]), arch="resnet56", data=str(TRAIN), eval_data=str(TEST),
                          normalize="cifar", method=method, target=target, round_to=round_to, epochs=0,
                          reconstruct=False, bn_recalib=64, quantize="none", bench_batches=(), threads=threads,
                          out=None)
    except CompressorError as exc:
        return str(exc)
    return result.model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--targets", type=lambda s: [float(t) for t in s.split(",")],
                        default=[0.33, 0.5, 0.67, 0.8, 0.9])
    parser.add_argument("--blocks-targets", type=lambda s: [float(t) for t in s.split(",")], default=[0.33, 0.5],
                        help="fractions of the filters removed by depth pruning (--method blocks)")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_floor.json")
    args = parser.parse_args(argv)
    if missing(*DEPTHS.values(), TRAIN, TEST):
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models: dict[str, torch.nn.Module] = {}
    for name, path in DEPTHS.items():
        models[name] = load_model(path, arch=name).model.eval()
    skipped: dict[str, str] = {}
    for method, targets in (("l1", args.targets), ("blocks", args.blocks_targets)):
        for t in targets:
            model = pruned(t, args.round_to, args.threads, method)
            if isinstance(model, str):
                skipped[f"resnet56-{method}-{t}"] = model
            else:
                models[f"resnet56-{method}-{t}"] = model.eval()
    example = torch.zeros(1, 3, 32, 32)
    calib = [np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)]
    p50 = {"fp32": OnnxLatency(example, batch=1, threads=args.threads, repeats=args.repeats)(models),
           "int8": OnnxLatency(example, batch=1, threads=args.threads, calib=calib, repeats=args.repeats)(models)}
    rows = []
    for name, model in models.items():
        size = sizes(model, example)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        rows.append({"graph": name, "params": size["params"], "macs": size["macs"], "conv_layers": convs,
                     "fp32_p50_ms": round(p50["fp32"][name], 4), "int8_p50_ms": round(p50["int8"][name], 4),
                     "fp32_speedup": round(p50["fp32"]["resnet56"] / p50["fp32"][name], 3),
                     "int8_speedup_over_int8_resnet56": round(p50["int8"]["resnet56"] / p50["int8"][name], 3),
                     "int8_speedup_over_fp32_resnet56": round(p50["fp32"]["resnet56"] / p50["int8"][name], 3)})
    out = {"threads": args.threads, "repeats": args.repeats, "round_to": args.round_to, "rows": rows,
           "skipped": skipped, "seconds": round(time.perf_counter() - start, 1), "machine": machine(),
           "versions": versions()}
    write_json(args.out, out)
    for r in rows:
        print(f"{r['graph']:>18}  MACs {r['macs'] / 1e6:6.1f}M  convs {r['conv_layers']:3d}  "
              f"fp32 {r['fp32_speedup']:.2f}x  int8/int8 {r['int8_speedup_over_int8_resnet56']:.2f}x  "
              f"int8/fp32 {r['int8_speedup_over_fp32_resnet56']:.2f}x")
    for k, v in skipped.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
