"""Screening: our methods against torch-pruning's own criteria (``tp-*``) at equal budget, before fine-tuning.

ResNet-20 (``../shared``, CIFAR-10, test1000) at ``--target 0.5 --target-metric macs`` (half the MACs), every
pruning method through :func:`compressor.compress` with the same budget search, ``--round-to 8``, the same
reconstruction (``--reconstruct``, 256 calibration images) and ``--epochs 0`` by default; ``--budget-minutes M``
adds the same time-budgeted fine-tuning to every method (the issue's screening stage uses 5). Records top-1 before
fine-tuning (after reconstruction), after fine-tuning, the scoring and reconstruction seconds. fp32 only.
``--distill`` fine-tunes with distillation from the original (issue 13, item 2: is it worth being the default?).

Usage::

    python -m benchmarks.peers_screen [--methods l1,cmi,...] [--budget-minutes 5] [--model resnet20]

Writes ``benchmarks/results/peers_screen[-<minutes>min].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from compressor import compress
from compressor.errors import CompressorError
from compressor.report import machine, versions

from ._child import write_json
from ._paths import CHECKPOINTS, RESULTS, TEST, TRAIN, missing

METHODS = ("random", "l1", "cmi", "cmi-uniform", "mipp", "tp-magnitude", "tp-lamp", "tp-bn", "tp-fpgm", "tp-taylor",
           "tp-hessian")
#: Rows that are a method with options: ``cmi-uniform`` is cmi's ranking with the uniform widths the others use.
VARIANTS = {"cmi-uniform": ("cmi", {"cmi_cutoff": "uniform"})}


def one_run(model: str, method: str, budget: float | None, target: float, distill: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    name, options = VARIANTS.get(method, (method, {}))
    try:
        report = compress(str(CHECKPOINTS[model]), arch=model, data=str(TRAIN), eval_data=str(TEST),
                          normalize="cifar", method=name, method_options=options, target=target,
                          target_metric="macs", round_to=8,
                          budget_minutes=budget, distill=distill, quantize="none", bench_batches=(), seed=0,
                          out=None).report
    except CompressorError as exc:
        return {"method": method, "error": str(exc), "run_s": round(time.perf_counter() - start, 1)}
    timings = report["timings"]
    return {"method": method, "achieved_macs": round(report["method"]["achieved"], 4),
            "params": report["compressed"]["params"], "top1_original": report["original"]["accuracy"],
            "top1_before_finetune": report["compressed"]["accuracy_before_finetune"],
            "top1": report["compressed"]["accuracy"], "finetune_epochs": report["finetune"]["epochs"],
            "compress_s": timings.get("compress"), "reconstruct_s": timings.get("reconstruct"),
            "finetune_s": timings.get("finetune"), "run_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--model", choices=sorted(CHECKPOINTS), default="resnet20")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs removed (0.5)")
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--distill", action="store_true", help="fine-tune with distillation from the original")
    parser.add_argument("--out", type=Path, default=None, help="results file; rows already there for other methods "
                        "are kept (so methods can be added in later runs)")
    args = parser.parse_args(argv)
    if missing(CHECKPOINTS[args.model], TRAIN, TEST):
        return 0
    suffix = ("" if args.budget_minutes is None else f"-{args.budget_minutes:g}min") + ("-distill" if args.distill
                                                                                        else "")
    out = args.out or RESULTS / f"peers_screen{suffix}.json"
    settings = {"model": args.model, "target": {"fraction": args.target, "metric": "macs"},
                "budget_minutes": args.budget_minutes, "distill": args.distill}
    earlier = json.loads(out.read_text()) if out.exists() else {}
    same = earlier and all(earlier.get(k) == v for k, v in settings.items())
    rows = [r for r in earlier.get("rows", []) if r["method"] not in args.methods] if same else []
    commands = (earlier.get("commands", []) if same else []) + [
        "python -m benchmarks.peers_screen " + " ".join(sys.argv[1:] if argv is None else argv)]
    for method in args.methods:
        row = one_run(args.model, method, args.budget_minutes, args.target, args.distill)
        rows.append(row)
        print(f"{method:13s} " + (row["error"] if "error" in row else
              f"before fine-tuning {row['top1_before_finetune']}  final {row['top1']}  ({row['run_s']} s)"),
              file=sys.stderr, flush=True)
        write_json(out, {"benchmark": "peers_screen", "commands": commands, **settings, "rows": rows,
                         "machine": machine(), "versions": versions()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
