"""Which torchvision architectures compress, and how the others end (issue 17): one ``compress`` CLI run per model and
method, the exit code and the report's verdict in a JSON table.

Usage (pinned to one core; resnext50 alone took 11 min with l1 on a shared core)::

    taskset -c 1 python -m benchmarks.zoo_probe --tag after

Each run is the command a new user types: random-init weights saved to a temporary ``model.pt``, 32x32 noise images
(uint8 NHWC ``.npz``, 10 classes), ``python -m compressor model.pt --arch benchmarks.zoo_probe:NAME --method M
--target 0.33 --epochs 0 --bench-batch none --bn-recalib 0``, run as a child process so that a crash (exit 1) is
recorded as such.
A row says ``compressed`` (exit 0, parity ok), ``refused`` (exit 2, the one-line error) or ``crash`` (anything
else, with the last line of stderr), plus the removed fraction, the parity numbers and the groups skipped.

Model code only (no weights are downloaded); torchvision is imported with the CPU-torch workaround of
:mod:`benchmarks.torchvision_models`. Writes ``benchmarks/results/zoo_probe-<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._paths import RESULTS
from .torchvision_models import INSTALL, available, import_torchvision

MODELS = ("resnext50_32x4d", "regnet_x_400mf", "shufflenet_v2_x0_5", "convnext_tiny", "efficientnet_b0")
METHODS = ("l1", "cmi")
NUM_CLASSES = 10
REPO = Path(__file__).resolve().parents[1]


def _build(name: str) -> nn.Module:
    model: nn.Module = getattr(import_torchvision().models, name)(weights=None, num_classes=NUM_CLASSES)
    return model


def resnext50_32x4d() -> nn.Module:
    """torchvision's ResNeXt-50 32x4d (grouped 3x3 convs), 10 classes, random weights."""
    return _build("resnext50_32x4d")


def regnet_x_400mf() -> nn.Module:
    """torchvision's RegNetX-400MF (grouped convs), 10 classes."""
    return _build("regnet_x_400mf")


def shufflenet_v2_x0_5() -> nn.Module:
    """torchvision's ShuffleNetV2 x0.5 (channel split, concat and shuffle), 10 classes."""
    return _build("shufflenet_v2_x0_5")


def convnext_tiny() -> nn.Module:
    """torchvision's ConvNeXt-T (layer scale, channels-last LayerNorm), 10 classes."""
    return _build("convnext_tiny")


def efficientnet_b0() -> nn.Module:
    """torchvision's EfficientNet-B0 (SiLU, squeeze-excitation), 10 classes."""
    return _build("efficientnet_b0")


def _verdict(rc: int, report: dict[str, Any] | None) -> str:
    if rc == 0 and report is not None and report.get("parity", {}).get("ok"):
        return "compressed"
    if rc == 2:
        return "refused"
    return "crash"


def probe(name: str, method: str, work: Path, data: Path, *, target: float, timeout: float) -> dict[str, Any]:
    """One CLI run of ``name`` with ``method``; the row of the table."""
    weights = work / f"{name}.pt"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(globals()[name]().state_dict(), weights)
    out = work / f"{name}-{method}"
    cmd = [sys.executable, "-m", "compressor", str(weights), "--arch", f"benchmarks.zoo_probe:{name}",
           "--data", str(data), "--eval-data", str(data), "--method", method, "--target", str(target),
           "--epochs", "0", "--bench-batch", "none", "--bn-recalib", "0", "--calib-samples", "64",
           "--out", str(out), "--overwrite"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "COLUMNS": "400"})
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = -9, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    lines = [line.strip(" │╭╰─╮╯") for line in err.splitlines()]
    lines = [line for line in lines if line and line != "Error"]
    row: dict[str, Any] = {"model": name, "method": method, "exit": rc, "verdict": _verdict(rc, report),
                           "seconds": round(seconds, 1), "error": lines[-1][:400] if rc != 0 and lines else None}
    if report is not None:
        section = report.get("method", {})
        parity = report.get("parity", {})
        compressed = parity.get("compressed", parity) if isinstance(parity, dict) else {}
        row.update({"achieved": section.get("achieved"), "parity": compressed,
                    "skipped": section.get("details", {}).get("skipped") or section.get("skipped")})
    return row


def _noise_npz(path: Path, n: int = 128) -> None:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, NUM_CLASSES, n).astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="after", help="results/zoo_probe-<tag>.json")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--target", type=float, default=0.33)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--append", action="store_true", help="add to (replace same model/method in) the table")
    args = parser.parse_args(argv)
    if not available():
        print(f"skipped: torchvision is not installed ({INSTALL})", file=sys.stderr)
        return 0
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"zoo_probe-{args.tag}.json"
    old = json.loads(path.read_text()) if args.append and path.exists() else {}
    rows = list(old.get("rows", []))
    commands = list(old.get("commands", []))
    commands.append("taskset -c 1 python -m benchmarks.zoo_probe " + " ".join(sys.argv[1:] if argv is None
                                                                              else argv))
    with tempfile.TemporaryDirectory(prefix="zoo_probe-") as tmp:
        work = Path(tmp)
        data = work / "noise32.npz"
        _noise_npz(data)
        for name in args.models:
            for method in args.methods:
                row = probe(name, method, work, data, target=args.target, timeout=args.timeout)
                print(json.dumps(row), flush=True)
                rows = [r for r in rows if (r["model"], r["method"]) != (name, method)] + [row]
                payload = {"commands": commands, "torch": torch.__version__,
                           "torchvision": import_torchvision().__version__,
                           "input": "32x32 uint8 noise, 128 images, 10 classes", "rows": rows}
                path.write_text(json.dumps(payload, indent=2) + "\n")  # after every run: a partial table survives
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
