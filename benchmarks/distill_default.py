"""Should fine-tuning distil from the original by default (issue 13, item 2)? Paired runs, equal wall-clock budget.

For each method and seed, the same compressed model (same scoring, removal and reconstruction: everything before
fine-tuning is deterministic under the seed) is fine-tuned twice for the same ``--budget-minutes``: with plain
cross-entropy and with logit distillation from the original (``--distill``). Equal *time*, not equal epochs:
distillation pays a teacher forward pass per batch, so it sees fewer images in the same minutes — the comparison a
user with "an hour of CPU" cares about. Top-1 on test1000; the paired difference (distill - plain) per seed removes
most of the test set's sampling noise shared by both runs. fp32 only, no latency.

Usage::

    taskset -c 0 python -m benchmarks.distill_default [--model resnet56] [--methods l1] [--seeds 0,1,2]
        [--budget-minutes 4] [--target 0.33] [--threads 1]

Writes ``benchmarks/results/distill_default.json`` (rows already there with the same settings are kept and not
re-run, so an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from compressor import compress
from compressor.report import machine, versions

from ._child import write_json
from ._paths import CHECKPOINTS, RESULTS, TEST, TRAIN, missing


def one_run(model: str, method: str, seed: int, distill: bool, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    report = compress(str(CHECKPOINTS[model]), arch=model, data=str(TRAIN), eval_data=str(TEST), normalize="cifar",
                      method=method, target=args.target, budget_minutes=args.budget_minutes, distill=distill,
                      quantize="none", bench_batches=(), seed=seed, threads=args.threads, out=None).report
    ft = report["finetune"]
    return {"method": method, "seed": seed, "distill": distill, "top1_original": report["original"]["accuracy"],
            "top1_before_finetune": report["compressed"]["accuracy_before_finetune"],
            "top1": report["compressed"]["accuracy"], "finetune_epochs": ft.get("epochs"),
            "finetune_s": report["timings"].get("finetune"), "run_s": round(time.perf_counter() - start, 1)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean top-1 with and without distillation and the paired differences (distill - plain)."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        by = {(r["seed"], r["distill"]): r["top1"] for r in rows if r["method"] == method}
        seeds = sorted({s for s, _ in by if (s, True) in by and (s, False) in by})
        diffs = [round(100 * (by[s, True] - by[s, False]), 2) for s in seeds]
        out[method] = {"seeds": seeds, "plain": [by[s, False] for s in seeds], "distill": [by[s, True] for s in seeds],
                       "diff_points": diffs, "mean_diff_points": round(statistics.mean(diffs), 2) if diffs else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CHECKPOINTS), default="resnet56")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["l1"])
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--budget-minutes", type=float, default=4.0)
    parser.add_argument("--target", type=float, default=0.33, help="fraction of the filters removed")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_default.json")
    args = parser.parse_args(argv)
    if missing(CHECKPOINTS[args.model], TRAIN, TEST):
        return 0
    torch.set_num_threads(args.threads)
    settings = {"model": args.model, "target": {"fraction": args.target, "metric": "filters"},
                "budget_minutes": args.budget_minutes, "threads": args.threads}
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {}
    same = bool(earlier) and all(earlier.get(k) == v for k, v in settings.items())
    rows: list[dict[str, Any]] = earlier.get("rows", []) if same else []
    commands = (earlier.get("commands", []) if same else []) + [
        "python -m benchmarks.distill_default " + " ".join(sys.argv[1:] if argv is None else argv)]
    for seed in args.seeds:
        for method in args.methods:
            for distill in (False, True):
                if any(r["method"] == method and r["seed"] == seed and r["distill"] == distill for r in rows):
                    continue
                row = one_run(args.model, method, seed, distill, args)
                rows.append(row)
                print(f"{method} seed {seed} distill {distill}: {row['top1_before_finetune']} -> {row['top1']} "
                      f"({row['finetune_epochs']} epochs, {row['run_s']} s)", file=sys.stderr, flush=True)
                write_json(args.out, {"benchmark": "distill_default", "commands": commands, **settings,
                                      "rows": rows, "summary": summary(rows), "machine": machine(),
                                      "versions": versions()})
    print(json.dumps(summary(rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
