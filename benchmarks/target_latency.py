"""Does ``--target-latency`` deliver the latency it promises, and what does the search cost?

ResNet-56 (``../shared``, CIFAR-10) through :func:`compressor.compress` with ``--target-latency F`` instead of
``--target``: ``l1``, ``--epochs 0``, BN recalibrated on 1024 images, ``--bench-batch 1``, ``--round-to auto``
(the first probe picks the alignment), on the INT8 graph (the default with ``--data``) and on fp32
(``--quantize none``). Per run it records every probe of the search (fraction tried, both p50s timed in one call,
ratio), the fraction chosen, the seconds the compress stage took, and then the run's own final benchmark, which times
all graphs again, interleaved, after the search: ``final_ratio`` = compressed p50 / original p50 of the graph that
ships. A search is honest when ``final_ratio`` stays near ``F`` (machine noise makes it move by a few percent).

Usage::

    python -m benchmarks.target_latency [--runs int8:0.75,fp32:0.5] [--threads 1]

A budget out of reach is recorded with the search's one-line error (``error``), not as a crash.

Writes ``benchmarks/results/target_latency.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from compressor import compress
from compressor.errors import PruningError
from compressor.report import machine, versions

from ._child import write_json
from ._paths import CHECKPOINTS, RESULTS, TEST, TRAIN, missing

MODEL = CHECKPOINTS["resnet56"]


def one_run(goal: float, graph: str, threads: int | None, method: str) -> dict[str, Any]:
    """One ``compress(..., target_latency=goal)``; the search and the run's final benchmark."""
    start = time.perf_counter()
    try:
        return _run(goal, graph, threads, method, start)
    except PruningError as exc:
        return {"goal": goal, "graph": graph, "method": method, "threads": threads, "error": str(exc),
                "run_s": round(time.perf_counter() - start, 1)}


def _run(goal: float, graph: str, threads: int | None, method: str, start: float) -> dict[str, Any]:
    result = compress(str(MODEL), arch="resnet56", data=str(TRAIN), eval_data=str(TEST), normalize="cifar",
                      method=method, target_latency=goal, epochs=0, bn_recalib=1024, bench_batches=(1,),
                      quantize="int8" if graph == "int8" else "none", threads=threads, out=None)
    seconds = time.perf_counter() - start
    report = result.report
    search = report["method"]["latency_target"]
    key = "compressed.int8" if graph == "int8" else "compressed"
    base = "original.int8" if graph == "int8" else "original"
    lat = report["latency"].get(1) or report["latency"]["1"]
    final = lat[key]["p50_ms"] / lat[base]["p50_ms"]
    return {"goal": goal, "graph": graph, "method": method, "threads": threads, "chosen_target": search["target"],
            "search_ratio": search["ratio"], "final_ratio": round(final, 4),
            "speedup_over_fp32_original": round(lat["original"]["p50_ms"] / lat[key]["p50_ms"], 3),
            "probes": search["probes"], "round_to": search["round_to"], "search_seconds": search["seconds"],
            "compress_stage_s": report["timings"].get("compress"), "run_s": round(seconds, 1),
            "macs": report["compressed"]["macs"], "macs_original": report["original"]["macs"],
            "top1_original": report["original"]["accuracy"],
            "top1_before_finetune": report["compressed"]["accuracy"],
            "top1_int8": (report.get("int8") or {}).get("compressed", {}).get("accuracy")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=lambda s: [(g, float(v)) for g, v in (r.split(":") for r in s.split(","))],
                        default=[("int8", 0.75), ("fp32", 0.5)], help="graph:goal pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="l1")
    parser.add_argument("--out", type=Path, default=RESULTS / "target_latency.json")
    args = parser.parse_args(argv)
    if missing(MODEL, TRAIN, TEST):
        return 0
    rows = []
    for graph, goal in args.runs:
        row = one_run(goal, graph, args.threads, args.method)
        rows.append(row)
        print(f"{graph} goal {goal}: " + (row["error"] if "error" in row else
              f"target {row['chosen_target']} search {row['search_ratio']} final {row['final_ratio']} "
              f"({row['speedup_over_fp32_original']}x fp32 original) in {row['compress_stage_s']} s"),
              file=sys.stderr, flush=True)
        write_json(args.out, {"benchmark": "target_latency", "command": "python -m benchmarks.target_latency "
                                  + " ".join(sys.argv[1:] if argv is None else argv),
                                  "model": "resnet56", "rows": rows, "machine": machine(), "versions": versions()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
