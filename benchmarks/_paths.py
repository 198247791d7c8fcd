"""Where the benchmarks find ``../shared`` (read-only: trained checkpoints and CIFAR-10) and write their results."""

from __future__ import annotations

import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = {"resnet20": SHARED / "models/cifar10-resnet/resnet20-12fca82f.th",
               "resnet56": SHARED / "models/cifar10-resnet/resnet56-4bfd9763.th"}
TRAIN = SHARED / "data/cifar10/train.npz"
TEST = SHARED / "data/cifar10/test1000.npz"
RESULTS = Path(__file__).parent / "results"


def missing(*paths: Path) -> bool:
    """True (after saying which file, on stderr) when one of ``paths`` is absent: the script then skips."""
    for path in paths:
        if not path.exists():
            print(f"skipped: not found: {path} (the ../shared checkout)", file=sys.stderr)
            return True
    return False
