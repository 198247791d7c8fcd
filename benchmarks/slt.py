"""Strong lottery tickets in a partially frozen random network (issue 15; Otsuka et al., arXiv 2402.14029), at a
scale that fits one CPU core: accuracy against ``--freeze`` at a fixed ``--keep``, the frozen source against the
dense source and a randomly pruned source of the same search-space size, the weight-trained network, and the size in
bits of each.

Every row is one :func:`compressor.slt_run.run_slt` call (what ``compress slt`` runs), with the same architecture,
seeds, training images, epochs and learning rate; only the source network differs:

* ``dense``: ``--freeze 0`` (plain edge-popup), search space = all weights;
* ``frozen F``: ``--freeze F`` (pruned share ``1 - keep``), search space ``1 - F``;
* ``pruned F``: ``--freeze F --freeze-prune 1`` (a randomly pruned source of density ``1 - F``, the approach the paper
  improves on), search space ``1 - F``, ticket ``keep = (1 - F) / 2`` (it cannot keep more than its source has;
  half of it, edge-popup's usual ratio);
* ``weights``: ``--train-weights`` (the weights of the same architecture trained for the same epochs).

Usage::

    taskset -c 1 python -m benchmarks.slt [--arch resnet20] [--keep 0.5] [--freezes 0,0.5,0.7] [--pruned 0.5,0.7]
        [--train-images 5000] [--epochs 4] [--lr 0.1] [--threads 1]
    python -m benchmarks.slt --render   # table + plot into docs/RESULTS.md from benchmarks/results/slt.json

Writes ``benchmarks/results/slt.json`` after every row (a stopped run keeps what it measured), the plot
``benchmarks/results/slt.png`` and the ``Strong lottery tickets`` section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._paths import RESULTS, TEST, TRAIN, missing

OUT = RESULTS / "slt.json"
PLOT = RESULTS / "slt.png"
DOC = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
BEGIN, END = "<!-- slt:begin -->", "<!-- slt:end -->"


def _row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    size = report["size"]
    cfg = report["config"] or {}
    stored = size.get("total_bits", size.get("fp32_bits"))
    return {"name": name, "kind": report["kind"], "keep": cfg.get("keep"), "freeze": cfg.get("freeze"),
            "freeze_prune": cfg.get("freeze_prune"), "top1": report["accuracy"],
            "search_space": (size["mask_bits"] / size["weights"]) if "mask_bits" in size else None,
            "mask_bits": size.get("mask_bits"), "stored_bits": stored,
            "dense_source_slt_bits": size.get("dense_source_slt_bits"), "fp32_bits": size.get(
                "fp32_weight_trained_bits", size.get("fp32_bits")),
            "onnx_bytes": report["onnx"]["bytes"], "onnx_deflated_bytes": report["onnx"]["deflated_bytes"],
            "p50_ms_b1": {k: v["p50_ms"] for k, v in report.get("latency", {}).get("latency", {}).get("1", {}).items()},
            "bit_identical_reload": report.get("reload", {}).get("bit_identical"),
            "parity_max_abs_diff": report["onnx"]["parity"]["max_abs_diff"],
            "train_seconds": report["training"]["seconds"], "epochs": report["training"]["epochs"],
            "eval_acc_per_epoch": [h.get("eval_acc") for h in report["training"]["history"]]}


def run(args: argparse.Namespace) -> None:
    from compressor.slt import SLTConfig
    from compressor.slt_run import run_slt

    if missing(TRAIN, TEST):
        return
    plan: list[tuple[str, SLTConfig | None]] = []
    tag = "" if args.seed == 0 else f" (seed {args.seed})"
    seeds = {"weight_seed": args.seed, "freeze_seed": args.seed + 1, "score_seed": args.seed + 2}
    for f in args.freezes:
        name = ("dense" if f == 0 else f"frozen {f:g}") + ("" if args.keep == 0.5 else f" keep {args.keep:g}") + tag
        plan.append((name, SLTConfig(keep=args.keep, freeze=f, **seeds)))
    for f in args.pruned:
        plan.append((f"pruned {f:g}{tag}", SLTConfig(keep=(1 - f) / 2, freeze=f, freeze_prune=1.0, **seeds)))
    if args.weights:
        plan.append(("weights", None))
    results: dict[str, Any] = {"meta": {"arch": args.arch, "keep_of_frozen_rows": args.keep,
                                        "train_images": args.train_images,
                                        "epochs": args.epochs, "lr": args.lr, "threads": args.threads,
                                        "eval": str(TEST.name), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                        "command": "python -m benchmarks.slt " + " ".join(args.argv)},
                               "rows": []}
    if args.append and OUT.exists():  # more rows for the same table (same recipe): keep what is there
        old = json.loads(OUT.read_text())
        results["rows"] = old["rows"]
        results["meta"] = {**old["meta"], "invocations": [*old["meta"].get("invocations", [old["meta"]["command"]]),
                                                          results["meta"]["command"]]}
        results["note"] = old.get("note", "")
    for name, cfg in plan:
        print(f"[slt] {name}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result = run_slt(arch=args.arch, data=str(TRAIN), eval_data=str(TEST), normalize="imagenet", slt=cfg,
                             train_weights=cfg is None, epochs=args.epochs, lr=args.lr, batch_size=128, seed=args.seed,
                             train_images=args.train_images, threads=args.threads, device="cpu",
                             bench_batches=(1,), bench_repeats=args.repeats, out=Path(tmp) / "run", progress=True,
                             command=["benchmarks.slt", name])
        row = _row(name, result.report)
        results["rows"].append(row)
        print(f"[slt] {name}: top-1 {100 * row['top1']:.1f} %, stored {row['stored_bits']:,} bits", flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    render()


def _plot(rows: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    try:
        for group, marker in (("slt-dense-source", "s"), ("slt-frozen", "o"), ("slt-pruned-source", "v"),
                              ("weight-trained", "*")):
            pts = [r for r in rows if r["kind"] == group]
            if pts:
                ax.scatter([r["stored_bits"] for r in pts], [100 * r["top1"] for r in pts], marker=marker, label=group)
                for r in pts:
                    ax.annotate(r["name"], (r["stored_bits"], 100 * r["top1"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("stored bits (mask + seeds + BN statistics; fp32 for weights)")
        ax.set_ylabel("top-1 (%) on test1000")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(PLOT, dpi=120)
    finally:
        plt.close(fig)
    return True


def render() -> None:
    """The table and plot of ``slt.json`` into the ``Strong lottery tickets`` section of ``docs/RESULTS.md``."""
    data = json.loads(OUT.read_text())
    rows, meta = data["rows"], data["meta"]
    plotted = _plot(rows)
    lines = [BEGIN, "## Strong lottery tickets (`compress slt`)", "",
             f"`{meta['command']}` ({meta['started']}): {meta['arch']}, CIFAR-10, {meta['train_images']} "
             f"class-balanced training images, {meta['epochs']} epochs (score search, or weight training for "
             f"`weights`), lr {meta['lr']}, {meta['threads']} thread; top-1 on `{meta['eval']}` (1000 images, "
             "about ±1.5 points sampling error at these accuracies). Stored bits: mask bits of the searched weights + "
             "two 64-bit seeds + BatchNorm running statistics (float32); `weights` is the float32 model. Latency: "
             "onnxruntime p50 at batch 1 of the ticket's masked dense graph beside the unmasked source graph.", "",
             *([f"Rows added by: {'; '.join(f'`{c}`' for c in meta['invocations'][1:])} (same recipe; a name with "
                "`keep K` ran at that --keep, `(seed S)` with weight/freezing/score seeds S, S+1, S+2).", ""]
               if meta.get("invocations") else []),
             "| source | keep | search space | top-1 | mask bits | stored bits | dense-source ticket bits | ONNX bytes "
             "(deflated) | p50 b1 ticket / source (ms) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        space = "-" if r["search_space"] is None else f"{r['search_space']:.2f}"
        lat = r["p50_ms_b1"]
        lat_text = " / ".join(f"{v:.3f}" for v in lat.values()) if lat else "-"
        lines.append(f"| {r['name']} | {keep} | {space} | {100 * r['top1']:.1f} % | "
                     f"{'-' if r['mask_bits'] is None else format(r['mask_bits'], ',')} | {r['stored_bits']:,} | "
                     f"{'-' if r['dense_source_slt_bits'] is None else format(r['dense_source_slt_bits'], ',')} | "
                     f"{r['onnx_bytes']:,} ({r['onnx_deflated_bytes']:,}) | {lat_text} |")
    lines.append("")
    if plotted:
        lines += ["![top-1 against stored bits](../benchmarks/results/slt.png)", ""]
    lines += [data.get("note", "").strip(), "", END]
    section = "\n".join(lines) + "\n"
    text = DOC.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text)
    print(f"wrote {DOC} section and {PLOT if plotted else 'no plot (matplotlib missing)'}")


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--freezes", type=lambda s: [float(v) for v in s.split(",") if v], default=[0.0, 0.5, 0.7])
    p.add_argument("--pruned", type=lambda s: [float(v) for v in s.split(",") if v], default=[0.5, 0.7])
    p.add_argument("--no-weights", dest="weights", action="store_false")
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="weight seed; freezing seed + 1, score seed + 2")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--append", action="store_true", help="add the rows to slt.json instead of replacing it")
    p.add_argument("--render", action="store_true", help="only re-render docs/RESULTS.md from slt.json")
    args = p.parse_args(argv)
    args.argv = argv
    if args.render:
        render()
    else:
        run(args)


if __name__ == "__main__":
    main()
