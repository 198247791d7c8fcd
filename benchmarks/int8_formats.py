"""Which INT8 format should the deploy stage use? Activations U8/S8 x calibration minmax/percentile/entropy.

For each trained CIFAR-10 ResNet of ``../shared`` and each format (per-channel S8 weights throughout), quantise the
exported fp32 graph with :func:`compressor.quantize.quantize_int8` on the same calibration images (``--calib`` from
``train.npz``, seeded), then record: top-1 on ``test1000.npz`` against the fp32 graph's, top-1 agreement with fp32,
file bytes, quantisation seconds (pre-processing, calibration and quantisation), and the p50 latency of every graph
timed in one interleaved run with the fp32 one at batch 1 and 32, on 1 thread and on onnxruntime's default threads
(speed-up = fp32 p50 / INT8 p50). It also records what :func:`~compressor.quantize.choose_format` picks on this
machine, the cost of :func:`~compressor.quantize.node_sensitivity` (the fallback's ranking), and a
:func:`~compressor.quantize.quantize_verified` run with the defaults. With 1,000 test images a top-1 has a sampling
error of about +-0.9 points: formats are compared on the same images.

Usage::

    python -m benchmarks.int8_formats [--models resnet20,resnet56] [--calib 256] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.data import calibration_subset, load_dataset, make_loader, parse_normalize
from compressor.io import load_model
from compressor.quantize import (
    ACTIVATIONS,
    CALIBRATIONS,
    Int8Format,
    agreement,
    choose_format,
    node_sensitivity,
    onnx_top1,
    quantize_int8,
    quantize_verified,
)
from exporters import benchmark_latency, export_onnx, runtime_info

from ._child import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def _data(calib: int) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    norm = parse_normalize("cifar")
    train = load_dataset(SHARED / "data/cifar10/train.npz")
    test = load_dataset(SHARED / "data/cifar10/test1000.npz")
    calib_batches = [x.numpy() for x, _ in make_loader(calibration_subset(train, calib, seed=0), batch_size=32,
                                                       normalize=norm)]
    eval_batches = [(x.numpy(), y.numpy()) for x, y in make_loader(test, batch_size=100, normalize=norm)]
    return calib_batches, eval_batches


def _formats() -> list[Int8Format]:
    return [Int8Format(activation=a, calibration=c) for a in ACTIVATIONS for c in CALIBRATIONS]


def _label(fmt: Int8Format) -> str:
    return f"{fmt.activation}-{fmt.calibration}"


def _accuracy_rows(fp32: Path, folder: Path, calib: list[np.ndarray],
                   evaluation: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
    xs = [x for x, _ in evaluation]
    rows: dict[str, dict[str, Any]] = {}
    for fmt in _formats():
        start = time.perf_counter()
        path = quantize_int8(fp32, folder / f"{_label(fmt)}.onnx", calib, fmt=fmt)
        seconds = time.perf_counter() - start
        rows[_label(fmt)] = {"format": fmt.to_dict(), "quantise_s": round(seconds, 2), "bytes": path.stat().st_size,
                             "top1": onnx_top1(path, evaluation, threads=1),
                             "agreement": agreement(fp32, path, xs, threads=1)}
        print(f"  {_label(fmt)}: {rows[_label(fmt)]}", file=sys.stderr, flush=True)
    return rows


def _latency(fp32: Path, folder: Path, repeats: int) -> dict[str, Any]:
    graphs = {"fp32": fp32, **{_label(f): folder / f"{_label(f)}.onnx" for f in _formats()}}
    out: dict[str, Any] = {}
    for threads in (1, None):
        result = benchmark_latency(graphs, batch_sizes=(1, 32), threads=threads, repeats=repeats)
        key = "threads_1" if threads == 1 else "threads_default"
        out[key] = {str(b): {name: {"p50_ms": round(s.p50_ms, 4), "speedup": round(row["fp32"].p50_ms / s.p50_ms, 3)}
                             for name, s in row.items()} for b, row in result.latency.items()}
        print(f"  latency {key}: {out[key]}", file=sys.stderr, flush=True)
    return out


def _fallback(fp32: Path, folder: Path, calib: list[np.ndarray],
              evaluation: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    start = time.perf_counter()
    ranking = node_sensitivity(fp32, calib, fmt=Int8Format())
    sensitivity_s = time.perf_counter() - start
    verified = quantize_verified(fp32, folder / "verified.onnx", calib=calib, eval_batches=evaluation,
                                 fmt=Int8Format(), max_drop=0.01, fp32_accuracy=None)
    chosen, timing = choose_format(fp32, calib, batch=1, threads=1)
    return {"sensitivity_s": round(sensitivity_s, 2), "nodes": len(ranking),
            "most_sensitive": [[n, round(s, 5)] for n, s in ranking[:5]],
            "least_sensitive": [[n, round(s, 5)] for n, s in ranking[-2:]],
            "verified_default": {k: v for k, v in verified.to_dict().items() if k != "path"},
            "choose_format_b1_t1": {"chosen": chosen.to_dict(), **timing}}


def run_model(arch: str, calib: list[np.ndarray], evaluation: list[tuple[np.ndarray, np.ndarray]],
              repeats: int) -> dict[str, Any]:
    model = load_model(SHARED / "models/cifar10-resnet" / CHECKPOINTS[arch], arch=arch).model
    with tempfile.TemporaryDirectory(prefix="int8-formats-") as tmp:
        folder = Path(tmp)
        fp32 = export_onnx(model, folder / "fp32.onnx", torch.zeros(1, 3, 32, 32))
        fp32_top1 = onnx_top1(fp32, evaluation, threads=1)
        print(f"{arch}: fp32 top-1 {fp32_top1}", file=sys.stderr, flush=True)
        rows = _accuracy_rows(fp32, folder, calib, evaluation)
        latency = _latency(fp32, folder, repeats)
        fallback = _fallback(fp32, folder, calib, evaluation)
        return {"fp32": {"top1": fp32_top1, "bytes": fp32.stat().st_size}, "formats": rows, "latency": latency,
                **fallback}


def _cpu() -> dict[str, Any]:
    """CPU model and the x86 features the INT8 kernels use (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"model": model, "int8_features": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                                              if f in flags]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--calib", type=int, default=256, help="calibration images from train.npz")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_formats.json")
    args = parser.parse_args(argv)
    missing = [p for p in (SHARED / "data/cifar10/train.npz", SHARED / "models/cifar10-resnet") if not p.exists()]
    if missing:
        print(f"skipped: not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), os.getloadavg()
    calib, evaluation = _data(args.calib)
    models = {arch: run_model(arch, calib, evaluation, args.repeats) for arch in args.models.split(",")}
    payload = {
        "command": "python -m benchmarks.int8_formats " + " ".join(argv if argv is not None else sys.argv[1:]),
        "calibration_images": args.calib, "eval_images": sum(len(y) for _, y in evaluation),
        "repeats": args.repeats, "models": models, "seconds": round(time.perf_counter() - start, 1),
        "machine": {**_cpu(), "arch": platform.machine(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"torch": torch.__version__, **runtime_info()},
    }
    write_json(args.out, payload, indent=1)
    print(f"wrote {args.out} in {payload['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
