"""Which channel alignment is fastest on the graph that ships, and is ``--round-to auto`` worth what it costs?

ResNet-56 (``../shared``) pruned with ``l1`` at ``--target 0.33`` at every alignment K of 1, 2, 4, 8, 16, 32; the
original and every pruned model exported to fp32 ONNX and quantised to INT8 (``compressor.quantize.DEFAULT_FORMAT``,
256 calibration images of ``train.npz``, ``--normalize cifar``); then, per round, per onnxruntime thread count (1 and
onnxruntime's default) and per batch size (1 and 32), **all 14 graphs timed interleaved in one**
``exporters.benchmark_latency`` call, so machine noise hits every K alike. Speed-ups are over the fp32 original of
the same call. Finally the cost of ``auto``: ``compressor.pipeline.compress_model`` with ``round_to=8`` and with
``"auto"`` (fp32 and INT8 graph, batch 1, default threads), seconds and the K it chose.

Usage::

    python -m benchmarks.round_to_auto [--model ../shared/models/cifar10-resnet/resnet56-4bfd9763.th] [--rounds 2]

Writes ``benchmarks/results/round_to_auto.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from compressor import pipeline
from compressor.config import CompressConfig
from compressor.methods import build_method
from compressor.methods.base import Budget, MethodContext
from compressor.report import machine, versions
from compressor.widths import DEFAULT_CANDIDATES

from ._child import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models/cifar10-resnet/resnet56-4bfd9763.th"
DEFAULT_DATA = SHARED / "data/cifar10/train.npz"
RESULTS = Path(__file__).parent / "results" / "round_to_auto.json"


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any, CompressConfig]:
    cfg = CompressConfig(method="l1", target=args.target, epochs=0, bn_recalib=0, seed=0,
                         bench_batches=(1,), quantize="int8").validate()
    method = build_method("l1", {})
    loaded = pipeline.load(str(args.model), arch=args.arch)
    prepared = pipeline.prepare(loaded, str(args.data), None, normalize="cifar", cfg=cfg, method=method)
    return loaded, prepared, method, cfg


def _build(loaded: Any, prepared: Any, method: Any, target: float, k: int) -> tuple[Any, dict[str, Any]]:
    """The model pruned at alignment ``k`` (fixed, no timing) and its facts."""
    model = loaded.model
    ctx = MethodContext(example=prepared.example, num_classes=prepared.num_classes, device=torch.device("cpu"),
                        seed=0, budget=Budget(target, "filters", k), original=model)
    start = time.perf_counter()
    result = method.apply(model, ctx)
    seconds = time.perf_counter() - start
    facts = {"round_to": k, "build_s": round(seconds, 3), **pipeline.sizes(result.model, prepared.example),
             "achieved": round(pipeline.achieved(model, result.model, prepared.example, "filters"), 4),
             "keep": [g["keep"] for g in result.report["groups"]],
             "aligned_to": [g["aligned_to"] for g in result.report["groups"]]}
    return result.model, facts


def _graphs(models: dict[str, Any], example: torch.Tensor, calib: list[Any], folder: Path,
            facts: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """fp32 and INT8 ONNX graph of every model; export and quantisation seconds into ``facts``."""
    from exporters import export_onnx

    from compressor.quantize import quantize_int8

    paths = {}
    for name, model in models.items():
        start = time.perf_counter()
        fp32 = export_onnx(model.cpu().eval(), folder / f"{name}.onnx", example)
        exported = time.perf_counter()
        paths[f"{name}.fp32"] = fp32
        paths[f"{name}.int8"] = quantize_int8(fp32, folder / f"{name}.int8.onnx", calib)
        facts[name].update(export_s=round(exported - start, 3), quantize_s=round(time.perf_counter() - exported, 3),
                           fp32_bytes=fp32.stat().st_size, int8_bytes=paths[f"{name}.int8"].stat().st_size)
        print(f"{name}: {facts[name]}", file=sys.stderr, flush=True)
    return paths


def _time(paths: dict[str, Path], *, batch: int, threads: int | None, repeats: int, seed: int) -> dict[str, Any]:
    from exporters import benchmark_latency

    start = time.perf_counter()
    result = benchmark_latency({k: str(p) for k, p in paths.items()}, input_shape=(3, 32, 32), batch_sizes=(batch,),
                               threads=threads, repeats=repeats, seed=seed)
    p50 = {name: round(s.p50_ms, 5) for name, s in result.latency[batch].items()}
    base = p50["original.fp32"]
    return {"batch": batch, "threads": threads, "repeats": repeats, "seconds": round(time.perf_counter() - start, 2),
            "load_avg": round(os.getloadavg()[0], 2), "p50_ms": p50,
            "speedup": {name: round(base / v, 4) for name, v in p50.items()},
            "winner": {g: _winner(p50, g) for g in ("fp32", "int8")}}


def _winner(p50: dict[str, float], graph: str) -> int:
    pruned = {int(n.split(".")[0][1:]): v for n, v in p50.items() if n.endswith(graph) and n.startswith("k")}
    return min(pruned, key=lambda k: (pruned[k], k))


def _summary(timings: list[dict[str, Any]], ks: list[int]) -> list[dict[str, Any]]:
    """Per graph, batch and threads: median speed-up over rounds per K, the winner of each round, the best fixed K."""
    rows = []
    for graph in ("fp32", "int8"):
        for batch in sorted({t["batch"] for t in timings}):
            for threads in sorted({t["threads"] for t in timings}, key=lambda v: (v is None, v)):
                runs = [t for t in timings if t["batch"] == batch and t["threads"] == threads]
                median = {k: round(statistics.median(r["speedup"][f"k{k}.{graph}"] for r in runs), 3) for k in ks}
                original_int8 = round(statistics.median(r["speedup"]["original.int8"] for r in runs), 3)
                rows.append({"graph": graph, "batch": batch, "threads": threads, "speedup_median": median,
                             "original_int8_speedup": original_int8 if graph == "int8" else None,
                             "winners": [r["winner"][graph] for r in runs],
                             "best": max(median, key=lambda k: median[k])})
    return rows


def _auto_cost(loaded: Any, prepared: Any, method: Any, cfg: CompressConfig) -> list[dict[str, Any]]:
    """Seconds of the compress stage with round_to 8 and auto, on the fp32 and the INT8 graph (batch 1)."""
    rows = []
    for quantize in ("none", "int8"):
        for round_to in (8, "auto"):
            run = replace(cfg, round_to=round_to, quantize=quantize, bench_repeats=50).validate()
            start = time.perf_counter()
            compressed = pipeline.compress_model(loaded.model, method, prepared, run, torch.device("cpu"))
            seconds = time.perf_counter() - start
            alignment = compressed.report.get("alignment", {})
            rows.append({"graph": "int8" if quantize == "int8" else "fp32", "round_to": round_to,
                         "compress_s": round(seconds, 2), "chosen": alignment.get("chosen"),
                         "alignment": alignment or None})
            print(f"auto cost: {rows[-1]['graph']} round_to={round_to}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--target", type=float, default=0.33)
    parser.add_argument("--round-to", default=",".join(map(str, DEFAULT_CANDIDATES)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", default="1:200,32:30", help="timed runs per batch size")
    parser.add_argument("--no-cost", action="store_true", help="skip timing the compress stage with auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in (args.model, args.data):
        if not path.exists():
            print(f"skipped: not found: {path}", file=sys.stderr)
            return 0
    torch.set_num_threads(1)
    ks = [int(v) for v in args.round_to.split(",")]
    repeats = {int(b): int(n) for b, n in (item.split(":") for item in args.repeats.split(","))}
    loaded, prepared, method, cfg = _load(args)
    calib = [x.numpy() for x, _ in prepared.calib]
    models, facts = {"original": loaded.model}, {"original": pipeline.sizes(loaded.model, prepared.example)}
    for k in ks:
        models[f"k{k}"], facts[f"k{k}"] = _build(loaded, prepared, method, args.target, k)
    timings = []
    with tempfile.TemporaryDirectory(prefix="round-to-auto-") as tmp:
        paths = _graphs(models, prepared.example, calib, Path(tmp), facts)
        for round_ in range(args.rounds):
            for threads in (1, None):
                for batch, n in repeats.items():
                    timings.append({"round": round_, **_time(paths, batch=batch, threads=threads, repeats=n,
                                                             seed=round_)})
                    print({k: timings[-1][k] for k in ("round", "batch", "threads", "winner", "seconds")},
                          file=sys.stderr, flush=True)
    payload = {"model": str(args.model), "method": "l1", "target": args.target, "candidates": ks,
               "calibration_images": sum(len(c) for c in calib), "models": facts, "timings": timings,
               "summary": _summary(timings, ks), "auto_cost": None, "machine": machine(), "versions": versions()}
    write_json(args.out, payload, indent=2)  # the timings survive a failure of the cost runs
    if not args.no_cost:
        payload["auto_cost"] = _auto_cost(loaded, prepared, method, cfg)
        write_json(args.out, payload, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
