"""Golden record: what each method chooses on ResNet-20 (``../shared``) at ``--target 0.33 --epochs 0``.

``python -m benchmarks.golden`` writes ``tests/golden/resnet20_t033.json``; ``tests/test_golden.py`` re-runs the
same configurations through the public API and compares. It was first captured before the core redesign (issue 11)
so that the redesign could prove it changed no method's choices, except where a documented fix does.

What is recorded per method, read only from the public result (no internals):

* ``kept``: for every BatchNorm of the original that survives under the same name, the original channel indices it
  still holds. BatchNorm affine parameters are never changed by pruning or by BN recalibration (only running
  statistics are), so each kept channel is found by its exact ``(weight, bias)`` pair;
* ``ranks``: Tucker ranks ``[r_out, r_in]`` per factorised layer (the report's layer table);
* ``params``, ``macs``, ``filters`` of the compressed model and ``top1`` on ``test1000.npz`` (BN recalibrated, no
  fine-tuning).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = REPO / "tests" / "golden" / "resnet20_t033.json"
METHODS = ("l1", "random", "cmi", "mipp", "tucker", "cmi+tucker")
CHECKPOINT = "models/cifar10-resnet/resnet20-12fca82f.th"
TRAIN, TEST = "data/cifar10/train.npz", "data/cifar10/test1000.npz"


def kept_channels(original: nn.Module, compressed: nn.Module) -> dict[str, list[int]]:
    """Original channel indices kept by every same-named BatchNorm2d, matched by exact ``(weight, bias)``."""
    after = dict(compressed.named_modules())
    kept: dict[str, list[int]] = {}
    for name, bn in original.named_modules():
        other = after.get(name)
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(other, nn.BatchNorm2d):
            continue
        index = {(float(w), float(b)): i for i, (w, b) in enumerate(zip(bn.weight.tolist(), bn.bias.tolist()))}
        if len(index) != bn.num_features:
            raise ValueError(f"{name}: two channels share (weight, bias); cannot match channels")
        kept[name] = [index[(float(w), float(b))] for w, b in zip(other.weight.tolist(), other.bias.tolist())]
    return kept


@functools.lru_cache(maxsize=2)
def datasets(shared: Path = SHARED) -> tuple[Any, Any]:
    """The CIFAR-10 training and test sets, read once per process (the same objects ``compress`` would load)."""
    from compressor.data import load_dataset

    return load_dataset(str(shared / TRAIN)), load_dataset(str(shared / TEST))


def capture(method: str, shared: Path = SHARED) -> dict[str, Any]:
    """Run ``method`` through :func:`compressor.compress` (one torch thread, no benchmark) and record its choices.

    Stages added after the record was taken are off: reconstruction (it changes weights, hence top-1, by design) and
    INT8 (it changes none of the recorded numbers, only the time)."""
    from compressor import compress

    torch.set_num_threads(1)
    train, test = datasets(shared)
    result = compress(str(shared / CHECKPOINT), arch="resnet20", data=train, eval_data=test, normalize="cifar",
                      method=method, target=0.33, epochs=0, bench_batches=(), seed=0, threads=1, reconstruct=False,
                      quantize="none")
    compressed, report = result.report["compressed"], result.report
    return {
        "kept": kept_channels(result.original, result.model),
        "ranks": {r["name"]: r["ranks"] for r in report["layers"] if r.get("ranks")},
        "params": compressed["params"], "macs": compressed["macs"], "filters": compressed["filters"],
        "top1": compressed["accuracy"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args(argv)
    from benchmarks._child import write_json

    record = {"config": {"checkpoint": CHECKPOINT, "target": 0.33, "epochs": 0, "normalize": "cifar"},
              "methods": {m: capture(m) for m in args.methods.split(",")}}
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
