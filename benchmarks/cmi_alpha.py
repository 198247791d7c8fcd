"""Does the α = 2 ranking of ``--method cmi`` agree with the paper's α = 1.01, and how much faster is it?

On ResNet-56 (``../shared``) with real CIFAR-10 calibration images (256 by default, class-balanced, seeded), capture
every pruning group's channel maps exactly as the ``cmi`` scorer does (consumer input, pooled to ``--pool``), run
the greedy selection (:func:`compressor.scoring.selection.greedy_select`, unconditioned) at α = 2 (Frobenius
shortcut) and α = 1.01 (batched ``eigvalsh``), and record per group: Kendall τ between the two full rankings, the
overlap of their first-round (sufficient) sets and of their top halves, and the wall time of each. Times are for
one CPU thread (``torch.set_num_threads(1)``), float64, Gram matrices built once per group (timed separately).

Usage::

    python -m benchmarks.cmi_alpha [--samples 256] [--pool 4] [--max-groups 30] [--out results/cmi_alpha.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ._child import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models/cifar10-resnet/resnet56-4bfd9763.th"
DEFAULT_DATA = SHARED / "data/cifar10/train.npz"


def kendall_tau(order_a: torch.Tensor, order_b: torch.Tensor) -> float:
    """Kendall τ between two rankings of the same items (permutations, so no ties): ``(conc - disc) / (n(n-1)/2)``."""
    n = order_a.numel()
    pos_a, pos_b = torch.empty(n), torch.empty(n)
    pos_a[order_a] = torch.arange(n, dtype=torch.float32)
    pos_b[order_b] = torch.arange(n, dtype=torch.float32)
    sign = torch.sign(pos_a[:, None] - pos_a[None, :]) * torch.sign(pos_b[:, None] - pos_b[None, :])
    return float(sign.triu(diagonal=1).sum() / (n * (n - 1) / 2)) if n > 1 else 1.0


def _overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    return len(set(a[:k].tolist()) & set(b[:k].tolist())) / max(k, 1)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    from compressor import data as data_mod
    from compressor.io import load_model
    from compressor.methods.cmi import capture, find_taps
    from compressor.pruning import engine
    from compressor.scoring.kernels import gram_matrix, label_gram
    from compressor.scoring.selection import greedy_select

    torch.set_num_threads(1)
    model = load_model(args.model, arch=args.arch).model.eval()
    dataset = data_mod.load_dataset(str(args.data))
    calib = data_mod.make_loader(data_mod.calibration_subset(dataset, args.samples, seed=0), batch_size=128,
                                 normalize="imagenet")
    example = torch.zeros((1, *dataset.image_shape))
    graph = engine.build_graph(model, example)
    groups = engine.discover_groups(model, graph)
    (feats, labels, taps), capture_s = _timed(capture, model, find_taps(model, graph, groups), calib, pool=args.pool)
    a_y = label_gram(labels, 10, dtype=torch.float64)
    rows = []
    for tap in taps[: args.max_groups]:
        grams, gram_s = _timed(gram_matrix, feats[tap.root].double())
        fast, fast_s = _timed(greedy_select, grams, a_y, alpha=2.0)
        slow, slow_s = _timed(greedy_select, grams, a_y, alpha=1.01)
        c = grams.shape[0]
        rows.append({
            "group": tap.root, "tap": tap.module, "channels": c, "dim": int(feats[tap.root].shape[-1]),
            "kendall_tau": round(kendall_tau(fast.order, slow.order), 4),
            "sufficient": {"alpha_2": fast.sufficient, "alpha_1.01": slow.sufficient},
            "sufficient_overlap": round(_overlap(fast.order, slow.order, fast.sufficient), 4),
            "top_half_overlap": round(_overlap(fast.order, slow.order, c // 2), 4),
            "top_two_thirds_overlap": round(_overlap(fast.order, slow.order, round(2 * c / 3)), 4),
            "seconds": {"gram": round(gram_s, 4), "alpha_2": round(fast_s, 4), "alpha_1.01": round(slow_s, 4)},
        })
        print(f"{tap.root:>16} C={c:<3} tau={rows[-1]['kendall_tau']:+.3f} suff={fast.sufficient}/{slow.sufficient} "
              f"overlap={rows[-1]['sufficient_overlap']:.2f} a2={fast_s:.2f}s a1.01={slow_s:.2f}s", file=sys.stderr)
    taus = [r["kendall_tau"] for r in rows]
    t2, t101 = (sum(r["seconds"][k] for r in rows) for k in ("alpha_2", "alpha_1.01"))
    return {
        "model": str(args.model), "arch": args.arch, "samples": int(labels.numel()), "pool": args.pool,
        "groups": len(rows), "of_groups": len(taps), "threads": 1, "dtype": "float64",
        "capture_seconds": round(capture_s, 3),
        "summary": {"kendall_tau_median": round(statistics.median(taus), 4), "kendall_tau_min": round(min(taus), 4),
                    "kendall_tau_mean": round(statistics.fmean(taus), 4),
                    "sufficient_overlap_mean": round(statistics.fmean(r["sufficient_overlap"] for r in rows), 4),
                    "top_half_overlap_mean": round(statistics.fmean(r["top_half_overlap"] for r in rows), 4),
                    "top_two_thirds_overlap_mean": round(
                        statistics.fmean(r["top_two_thirds_overlap"] for r in rows), 4),
                    "seconds_alpha_2": round(t2, 3), "seconds_alpha_1.01": round(t101, 3),
                    "speedup": round(t101 / t2, 1),
                    "seconds_gram": round(sum(r["seconds"]["gram"] for r in rows), 3)},
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--max-groups", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cmi_alpha.json")
    args = parser.parse_args(argv)
    for path in (args.model, args.data):
        if not path.exists():
            print(f"skipped: not found: {path} (pass --model / --data)", file=sys.stderr)
            return 0
    result = run(args)
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
