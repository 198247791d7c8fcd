"""IMP on real vs distilled data, and linear-mode-connectivity instability: issue 14 item 4 at a 1-core scale.

McDermott & Cummings ("Linear Mode Connectivity in Sparse Neural Networks", arXiv 2310.18769) claim that iterative
magnitude pruning run on a small *distilled* data set finds sparse masks that (a) train on the real data to solutions
that are more stable to SGD noise (lower error barrier between two copies) and (b) match the accuracy of ordinary IMP
with far fewer training images. This script measures both on the trained ResNet-20 of ``../shared`` (CIFAR-10):

1. ``compress --method imp --imp-granularity weight --imp-rewind original`` (:func:`compressor.compress`, no final
   fine-tuning) at each ``--sparsity``, ``--rounds`` rounds of ``--steps-per-round`` SGD steps each, on
   * ``real``: ``--real-per-class`` real training images per class (seeded subset of ``train.npz``), one epoch a round;
   * ``distilled``: ``compress distill train.npz --images-per-class 10`` (distribution matching, the small settings of
     ``benchmarks/distill_quality.py``; made once, cached in ``--work``), as ``--imp-data``, with as many epochs per
     round as give the same number of SGD steps (100 images = one batch per epoch);
   * ``real-small`` (optional, ``--sources``): as many random real images as the distilled set has, same steps;
   * ``one-shot`` (optional): no data at all, ``--imp-epochs 0`` (global magnitude pruning of the trained weights);
2. the mask applied to the rewind point (the trained dense weights; masks kept by the Trainer's ``MaskKeeper``), then
   :func:`compressor.stability.stability`: two copies trained on the ``real`` subset for ``--final-steps`` steps
   with different SGD noise (seeds 1 and 2: batch order and augmentation), the error on ``test1000.npz`` at
   ``--points`` points of the straight line between them, BatchNorm statistics re-estimated at every point. That
   final real-data training budget is the same for every row; the dense network (no mask) is the reference.

Per row: top-1 (mean of the two trained copies, on test1000), the error barrier (instability), images used to find
the mask, and the overlap of the real and distilled masks. Everything runs on one thread; pin it yourself::

    OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.imp_lmc [--sparsity 0.5 0.8 0.9] [--sources real distilled]
    python -m benchmarks.imp_lmc --render-only      # rebuild the docs/RESULTS.md section and plot from the JSON

Resumable: rows already in ``benchmarks/results/imp_lmc.json`` with the same budget are skipped. Writes that JSON,
``docs/imp_lmc.png`` (beside ``--docs``) and a section of ``docs/RESULTS.md`` between ``<!-- imp_lmc:start -->`` and
``<!-- imp_lmc:end -->`` (appended if absent; the rest of the page is left as it is).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor import compress
from compressor.io import load_model
from compressor.methods.masks import MASK, apply_masks
from compressor.report import machine, versions
from compressor.stability import stability

from ._child import atomic_write_text, write_json
from ._paths import CHECKPOINTS, RESULTS, TEST, TRAIN, missing

REPO = Path(__file__).resolve().parents[1]
OUT = RESULTS / "imp_lmc.json"
DOCS = REPO / "docs" / "RESULTS.md"
PLOT_NAME = "imp_lmc.png"  # beside --docs
START, END = "<!-- imp_lmc:start -->", "<!-- imp_lmc:end -->"
IMP_KEYS = ("mask_images", "imp_epochs_per_round", "imp_steps_per_round", "imp_image_passes", "achieved",
            "top1_after_imp_rounds", "rounds")
SOURCES = ("real", "distilled", "real-small", "one-shot")


# ------------------------------------------------------------------------------------------------------ data
def real_subset(per_class: int, path: Path, seed: int) -> Path:
    """``per_class`` training images of each class (seeded), as an ``.npz`` at ``path`` (made once)."""
    if not path.exists():
        with np.load(TRAIN) as data:
            x, y = data["x"], data["y"]
        rng = np.random.default_rng(seed)
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                      for c in range(10)]))
        np.savez(path, x=x[idx], y=y[idx])
    return path


def distilled_set(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The distilled set, made once by the CLI (``compress distill``) and cached in ``--work``."""
    d = args.distill
    path = args.work / f"distilled_k{d['images_per_class']}_w{d['width']}_it{d['iterations']}_s{d['seed']}.npz"
    command = [sys.executable, "-m", "compressor", "distill", str(TRAIN), "--images-per-class",
               str(d["images_per_class"]), "--width", str(d["width"]), "--iterations", str(d["iterations"]),
               "--batch-real", str(d["batch_real"]), "--seed", str(d["seed"]), "--no-progress", "--out", str(path)]
    if not path.exists():
        print("making the distilled set: " + " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return path, command


# ------------------------------------------------------------------------------------------------- one row
def find_mask(target: float, source: str, data: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Weight IMP to ``target`` with its rounds on ``source``: the masks and what finding them cost."""
    imp_data = data.get(source)  # None for one-shot: no retraining, the rounds rank the trained weights
    images = 0
    if imp_data is not None:
        with np.load(imp_data) as archive:
            images = int(archive["y"].shape[0])
    steps_per_epoch = -(-images // args.batch_size)
    epochs = max(1, round(args.steps_per_round / steps_per_epoch)) if imp_data is not None else 0
    extra = {"imp_data": str(imp_data)} if imp_data is not None else {}
    start = time.perf_counter()
    result = compress(str(CHECKPOINTS["resnet20"]), arch="resnet20", data=str(data["real"]), eval_data=str(TEST),
                      normalize="imagenet", method="imp", target=target, epochs=0, lr=args.lr,
                      batch_size=args.batch_size, bench_batches=(1,), bench_repeats=3, threads=1, device="cpu",
                      round_to=1, seed=args.seed,
                      method_options={"imp_granularity": "weight", "imp_rounds": args.rounds, "imp_rewind": "original",
                                      "imp_epochs": epochs, **extra})
    masks = {name: getattr(m, MASK).detach().cpu().clone() for name, m in result.model.named_modules()
             if isinstance(getattr(m, MASK, None), torch.Tensor)}
    imp = result.report["method"]["imp"]
    return {"masks": masks, "row": {
        "mask_images": images, "imp_epochs_per_round": epochs, "imp_steps_per_round": epochs * steps_per_epoch,
        "imp_image_passes": args.rounds * epochs * images, "achieved": result.report["method"]["achieved"],
        "top1_after_imp_rounds": result.report["compressed"]["accuracy"],
        "rounds": [{k: r.get(k) for k in ("round", "goal", "achieved", "train")} for r in imp["rounds_detail"]],
        "imp_s": round(time.perf_counter() - start, 1)}}


def measure(masks: dict[str, torch.Tensor] | None, data: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """The rewind point (trained dense weights) with ``masks``: final real-data training of two copies + the path."""
    model = load_model(CHECKPOINTS["resnet20"], arch="resnet20").model
    if masks:
        apply_masks(model, masks)
    start = time.perf_counter()
    result = stability(model, data=str(data["real"]), eval_data=str(TEST), normalize="imagenet",
                       steps=args.final_steps, lr=args.lr, batch_size=args.batch_size, seeds=tuple(args.noise_seeds),
                       points=args.points, bn_images=args.bn_images, device="cpu", train_progress=False)
    return {"noise_seeds": list(args.noise_seeds), "top1": round((result.accuracy_a + result.accuracy_b) / 2, 4),
            "top1_a": round(result.accuracy_a, 4), "top1_b": round(result.accuracy_b, 4),
            "instability": round(result.barrier, 4), "path_errors": [round(e, 4) for e in result.errors],
            "sparsity_after_training": [r.get("sparsity", 0.0) for r in result.training],
            "stability_s": round(time.perf_counter() - start, 1)}


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Jaccard index of the pruned sets of two masks (1: the same weights removed)."""
    pa = torch.cat([(~a[k]).flatten() for k in sorted(a)])
    pb = torch.cat([(~b[k]).flatten() for k in sorted(b)])
    return round(float((pa & pb).sum()) / max(1, int((pa | pb).sum())), 4)


# ---------------------------------------------------------------------------------------------------- output
def render(payload: dict[str, Any]) -> str:
    """The docs/RESULTS.md section (between the markers)."""
    b, rows = payload["budget"], payload["rows"]
    dense = next((r for r in rows if r["source"] == "dense"), None)
    lines = [START, "## IMP on real vs distilled data: accuracy and linear-mode-connectivity instability", "",
             " then ".join(f"`{c}`" for c in payload.get("invocations", [payload["command"]])) +
             f" ({payload['meta']['seconds_total']:.0f} s of compute over the runs recorded; "
             "issue 14 item 4, arXiv 2310.18769 at a 1-core scale). ResNet-20 (trained, `../shared`), weight IMP "
             f"(`--imp-granularity weight --imp-rewind original`), {b['rounds']} rounds of {b['steps_per_round']} "
             f"SGD steps (batch {b['batch_size']}, lr {b['lr']:g}, cosine) on the mask-finding data; then the mask "
             f"on the trained dense weights, two copies trained on {b['real_images']} real images for "
             f"{b['final_steps']} steps each (the noise seeds of the table), error on test1000 at {b['points']} "
             f"points of the line between them (BatchNorm re-estimated on {b['bn_images']} images at every point). "
             "top-1 = mean of the two copies; instability = error barrier (max error on the path - mean of the "
             "endpoints). 1,000 test images: about +-0.9 points of sampling error at 90 %; every row is scored on "
             f"the same images. Distilled set: `compress distill` K = {b['distill']['images_per_class']} per class "
             f"({b['distill']['iterations']} iterations, ConvNet width {b['distill']['width']}).", "",
             "| sparsity | mask found on | images to find the mask | noise seeds | top-1 % | instability (points) | "
             "top-1 after IMP rounds % | mask overlap with real |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["sparsity"], SOURCES.index(r["source"]) if r["source"] in SOURCES else -1)):
        after = "" if r.get("top1_after_imp_rounds") is None else f"{100 * r['top1_after_imp_rounds']:.1f}"
        ov = "" if r.get("overlap_with_real") is None else f"{r['overlap_with_real']:.3f}"
        pair = ",".join(str(x) for x in r.get("noise_seeds", (1, 2)))
        lines.append(f"| {r['achieved']:.3f} | {r['source']} | {r.get('mask_images', 0):,} | {pair} | "
                     f"{100 * r['top1']:.1f} | {100 * r['instability']:.2f} | {after} | {ov} |")
    lines += ["", f"![top-1 and instability against sparsity]({PLOT_NAME})", ""]
    if dense is not None:
        lines += [f"Dense reference (same final training, noise seeds 1,2): top-1 {100 * dense['top1']:.1f} %, "
                  f"instability {100 * dense['instability']:.2f} points. The plot shows the mean over the noise-seed "
                  "pairs measured.", ""]
    for note in payload.get("notes", []):
        lines += [note, ""]
    lines.append(END)
    return "\n".join(lines)


def write_docs(payload: dict[str, Any], docs: Path) -> None:
    """Replace (or append) the marked section of ``docs``; the rest of the page is untouched."""
    text = docs.read_text() if docs.exists() else "# Benchmark results\n"
    section = render(payload)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(docs, text)


def _mean(rows: list[dict[str, Any]], achieved: float, key: str) -> float:
    values = [r[key] for r in rows if r["achieved"] == achieved]
    return sum(values) / len(values)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for source, style in (("real", "o-"), ("distilled", "s-"), ("real-small", "^--"), ("one-shot", "x:")):
        mine = [r for r in rows if r["source"] == source]
        if not mine:
            continue
        xs = sorted({r["achieved"] for r in mine})
        label = f"{source} ({mine[0]['mask_images']:,} images)"
        axes[0].plot(xs, [100 * _mean(mine, x, "top1") for x in xs], style, label=label)
        axes[1].plot(xs, [100 * _mean(mine, x, "instability") for x in xs], style, label=label)
    dense_rows = [r for r in rows if r["source"] == "dense"]
    if dense_rows:
        axes[0].axhline(100 * _mean(dense_rows, 0.0, "top1"), color="grey", ls=":", label="dense")
        axes[1].axhline(100 * _mean(dense_rows, 0.0, "instability"), color="grey", ls=":", label="dense")
    axes[0].set(xlabel="sparsity (zeros in conv+linear weights)", ylabel="top-1 % (test1000)")
    axes[1].set(xlabel="sparsity (zeros in conv+linear weights)", ylabel="error barrier (points)")
    axes[0].legend(fontsize=8)
    fig.suptitle("ResNet-20 weight IMP: mask found on real vs distilled data", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--sources", nargs="+", default=["real", "distilled"], choices=SOURCES)
    parser.add_argument("--real-per-class", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=16)
    parser.add_argument("--final-steps", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--bn-images", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-seeds", type=int, nargs=2, default=[1, 2],
                        help="SGD-noise seeds of the two copies (another pair re-measures rows, same masks)")
    parser.add_argument("--distill-iterations", type=int, default=250)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imp_lmc"), help="subsets and the distilled set")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--render-only", action="store_true", help="rebuild the docs section and plot from --out")
    args = parser.parse_args(argv)
    if args.render_only:
        stored = json.loads(args.out.read_text())
        plot(stored, args.docs.parent / PLOT_NAME)
        write_docs(stored, args.docs)
        return 0
    if missing(CHECKPOINTS["resnet20"], TRAIN, TEST):
        return 0
    torch.set_num_threads(1)
    args.distill = {"images_per_class": 10, "width": 32, "iterations": args.distill_iterations, "batch_real": 32,
                    "seed": 0}
    budget = {"rounds": args.rounds, "steps_per_round": args.steps_per_round, "final_steps": args.final_steps,
              "lr": args.lr, "batch_size": args.batch_size, "points": args.points, "bn_images": args.bn_images,
              "real_images": 10 * args.real_per_class, "seed": args.seed, "distill": args.distill,
              "rewind": "original", "granularity": "weight", "eval": "test1000.npz", "threads": 1}
    payload: dict[str, Any] = {"rows": [], "meta": {"seconds_total": 0.0}}
    if args.out.exists():
        payload = json.loads(args.out.read_text())
        if payload.get("budget") != budget:
            raise SystemExit(f"{args.out} holds rows of another budget; pass --out NEW.json (or move it away)")
    command = "OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.imp_lmc " + " ".join(
        argv if argv is not None else sys.argv[1:])
    invocations = payload.get("invocations") or ([payload["command"]] if "command" in payload else [])
    payload.update(budget=budget, command=command, invocations=[*invocations, command], machine=machine(),
                   versions=versions())
    args.work.mkdir(parents=True, exist_ok=True)
    data = {"real": real_subset(args.real_per_class, args.work / f"real{args.real_per_class}.npz", args.seed)}
    if "distilled" in args.sources:
        data["distilled"], payload["distill_command"] = distilled_set(args)
    if "real-small" in args.sources:
        data["real-small"] = real_subset(args.distill["images_per_class"], args.work / "real-small.npz",
                                         args.seed + 1)
    seeds = tuple(args.noise_seeds)
    done = {(r["source"], r["target"], tuple(r.get("noise_seeds", (1, 2)))) for r in payload["rows"]}
    tag = f"r{args.rounds}x{args.steps_per_round}-lr{args.lr:g}-n{10 * args.real_per_class}-s{args.seed}"

    def save(row: dict[str, Any]) -> None:
        payload["rows"].append(row)
        payload["meta"]["seconds_total"] = round(payload["meta"]["seconds_total"] + row.get("imp_s", 0.0)
                                                 + row["stability_s"], 1)
        write_json(args.out, payload)
        print(json.dumps({k: v for k, v in row.items() if k not in ("rounds", "path_errors")}), file=sys.stderr,
              flush=True)

    if ("dense", 0.0, seeds) not in done:
        save({"source": "dense", "target": 0.0, "sparsity": 0.0, "achieved": 0.0, "mask_images": 0,
              **measure(None, data, args)})
    for target in args.sparsity:
        for source in args.sources:
            if (source, target, seeds) in done:
                continue
            mask_file = args.work / f"masks-{source}-{target}-{tag}.pt"
            first = next((r for r in payload["rows"] if (r["source"], r["target"]) == (source, target)), None)
            if first is not None and mask_file.exists():  # another noise-seed pair: the same mask, not found again
                found = {"masks": torch.load(mask_file, weights_only=True),
                         "row": {k: v for k, v in first.items() if k in IMP_KEYS}}
            else:
                found = find_mask(target, source, data, args)
                torch.save(found["masks"], mask_file)
            row = {"source": source, "target": target, "sparsity": target, **found["row"]}
            real_file = args.work / f"masks-real-{target}-{tag}.pt"
            real = torch.load(real_file, weights_only=True) if real_file.exists() else None
            row["overlap_with_real"] = overlap(found["masks"], real) if real is not None else None
            save({**row, **measure(found["masks"], data, args)})
    payload["notes"] = payload.get("notes", [])
    write_json(args.out, payload)
    plot(payload, args.docs.parent / PLOT_NAME)
    write_docs(payload, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
