"""``--method imp`` on ResNet-20: issue 14's done-when checks, measured.

Two runs of :func:`compressor.compress` on the trained ResNet-20 of ``../shared`` (CIFAR-10; retraining on a
class-balanced subset of ``--per-class`` training images per class, written to a temporary ``.npz`` outside the
project; top-1 on test1000), the same as the CLI commands::

    compress resnet20-12fca82f.th --arch resnet20 --method imp --imp-granularity filter --target 0.33 \\
        --imp-rounds 3 --imp-epochs 1 --epochs 1 --data SUBSET.npz --eval-data test1000.npz --normalize imagenet \\
        --bench-batch 1 --out DIR
    (and --imp-granularity weight --target 0.8)

For each run it records what the report says (achieved fraction, top-1, ONNX bytes raw and deflated, parity,
onnxruntime latency at batch 1) and checks it from the files: the fraction of zeros in the Conv/Gemm initialisers of
``compressed.onnx``, the zeros and mask buffers of the model :func:`compressor.load_compressed` rebuilds from
``compressed.pt`` (``torch.load(weights_only=True)``), and the largest difference between that model and the ONNX
graph in onnxruntime. Then it times the original and compressed ONNX graphs interleaved, one onnxruntime thread,
batch 1 and 32, ``--repeats`` runs each: unstructured zeros leave a dense runtime's latency where it was.

Usage::

    python -m benchmarks.imp_resnet20 [--per-class 200] [--imp-epochs 1] [--epochs 1] [--repeats 300]

Writes ``benchmarks/results/imp_resnet20.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor import compress, load_compressed
from compressor.methods.masks import MASK, sparsity
from compressor.report import machine, versions

from ._child import atomic_write_text
from ._paths import CHECKPOINTS, RESULTS, TEST, TRAIN, missing

RUNS = (("filter", 0.33), ("weight", 0.8))


def subset(per_class: int, path: Path, seed: int = 0) -> None:
    """``per_class`` training images of each class, seeded, as an ``.npz`` at ``path``."""
    data = np.load(TRAIN)
    x, y = data["x"], data["y"]
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)])
    rng.shuffle(idx)
    np.savez(path, x=x[idx], y=y[idx])


def onnx_zeros(path: Path) -> dict[str, Any]:
    """Zeros among the Conv and Gemm weights (the 4-D and 2-D initialisers) of an ONNX file."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    weights = [w for w in weights if w.ndim in (2, 4)]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(int(w.size) for w in weights)
    return {"weights": total, "zeros": zeros, "fraction": round(zeros / total, 6)}


def replay_check(out: Path) -> dict[str, Any]:
    """The model ``load_compressed`` rebuilds: its zeros, its mask buffers, and its distance to the ONNX graph."""
    import onnxruntime as ort

    model = load_compressed(out / "compressed.pt")
    masked = [m for m in model.modules() if hasattr(m, MASK)]
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out / "compressed.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch_out = model(x).numpy()
    measured = sparsity(model)
    return {"zeros": measured["zeros"], "weights": measured["weights"], "fraction": measured["overall"],
            "mask_buffers": len(masked),
            "masked_entries_all_zero": all(bool((m.weight[~getattr(m, MASK)] == 0).all()) for m in masked),
            "max_abs_diff_vs_onnx": float(np.abs(onnx_out - torch_out).max())}


def interleaved_latency(out: Path, repeats: int) -> dict[str, Any]:
    """p50/p90 ms of ``original.onnx`` and ``compressed.onnx``, one onnxruntime thread, batch 1 and 32, ``repeats``
    runs interleaved (so a neighbour's load hits both graphs alike): a longer measurement than the report's."""
    from exporters import benchmark_latency

    bench = benchmark_latency({k: out / f"{k}.onnx" for k in ("original", "compressed")}, batch_sizes=(1, 32),
                              threads=1, repeats=repeats, warmup=20)
    return {str(b): {k: {"p50_ms": round(v.p50_ms, 4), "p90_ms": round(v.p90_ms, 4)} for k, v in stats.items()}
            for b, stats in bench.latency.items()}


def one_run(granularity: str, target: float, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    report = compress(str(CHECKPOINTS["resnet20"]), arch="resnet20", data=str(data), eval_data=str(TEST),
                      normalize="imagenet", method="imp", target=target, epochs=args.epochs, bench_batches=(1,),
                      out=out, method_options={"imp_granularity": granularity, "imp_rounds": args.rounds,
                                               "imp_epochs": args.imp_epochs}).report
    method, o, c = report["method"], report["original"], report["compressed"]
    imp, latency = method["imp"], report["latency"].get(1) or report["latency"].get("1")
    return {"granularity": granularity, "target": target, "target_metric": method["target_metric"],
            "achieved": method["achieved"], "stages": method["stages"],
            "rounds": [{k: r.get(k) for k in ("round", "goal", "achieved", "train")} for r in imp["rounds_detail"]],
            "top1_original": o["accuracy"], "top1": c["accuracy"],
            "params": [o["params"], c["params"]], "filters": [o["filters"], c["filters"]],
            "onnx_bytes": [o["onnx_bytes"], c["onnx_bytes"]],
            "onnx_deflated_bytes": [o["onnx_deflated_bytes"], c["onnx_deflated_bytes"]],
            "parity": {k: report["parity"][k] for k in ("max_abs_diff", "top1_agreement", "n_samples")},
            "p50_ms_batch1": {k: latency[k]["p50_ms"] for k in ("original", "compressed")},
            "onnx_zeros": onnx_zeros(out / "compressed.onnx"), "replayed": replay_check(out),
            "latency_interleaved_1_thread": interleaved_latency(out, args.repeats),
            "layer_sparsity": {k: v["sparsity"] for k, v in imp.get("sparsity", {}).get("layers", {}).items()},
            "run_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--imp-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300, help="interleaved latency runs per graph and batch")
    args = parser.parse_args(argv)
    if missing(CHECKPOINTS["resnet20"], TRAIN, TEST):
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="imp-resnet20-") as tmp:
        data = Path(tmp) / "train_subset.npz"
        subset(args.per_class, data)
        for granularity, target in RUNS:
            rows.append(one_run(granularity, target, data, Path(tmp) / granularity, args))
            print(json.dumps(rows[-1])[:400], file=sys.stderr)
    result = {"setup": {"model": "resnet20 (../shared)", "train_images": 10 * args.per_class, "rounds": args.rounds,
                        "imp_epochs": args.imp_epochs, "epochs": args.epochs, "eval": "test1000"},
              "runs": rows, "machine": machine(), "versions": versions()}
    atomic_write_text(RESULTS / "imp_resnet20.json", json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
