"""One configuration of a benchmark suite, run in its own process so that its peak memory is its own.

``python -m benchmarks._child JOB.json ROW.json`` reads the job written by :mod:`benchmarks.run`, runs
:func:`compressor.compress` on it and writes one flat result row (atomically). A :class:`CompressorError` (e.g. a
target the method cannot reach) or any other exception becomes a failed row carrying its one-line message; the
process still exits 0 so that the suite goes on. ``peak_rss_mib`` is ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end:
it includes the interpreter, torch and the training set loaded in memory (the same for every configuration).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; a results file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any, *, indent: int = 1) -> None:
    """Write a benchmark's results file atomically (folders created as needed)."""
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def summarise(report: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    """The flat row of one report: sizes before/after, top-1 at each stage, latency, efficiency, stage timings,
    and the INT8 columns (:func:`int8_columns`) when the run quantised.

    Top-1: ``top1_orig`` (original), ``top1_pruned_stale_bn`` (compressed, BatchNorm statistics as inherited),
    ``top1_pruned`` (after BatchNorm recalibration, before fine-tuning), ``top1_finetuned``; with a curve
    (``--eval-every-minutes``), ``curve`` (top-1 along the fine-tuning), ``finetune_epochs`` and ``finetune_s``.

    ``mac_reduction`` is original MACs / compressed MACs; ``efficiency_b<B>`` is the measured onnxruntime speedup at
    batch B divided by it (1.0: every removed MAC became saved time).
    """
    o, c, m = report["original"], report["compressed"], report["method"]
    row: dict[str, Any] = {"target_metric": m["target_metric"], "achieved": round(m["achieved"], 4)}
    for key in ("params", "macs", "filters", "onnx_bytes"):
        row[f"{key}_orig"], row[key] = o[key], c[key]
    row.update(top1_orig=o["accuracy"], top1_pruned_stale_bn=c.get("accuracy_before_bn_recalib"),
               top1_pruned=c.get("accuracy_before_finetune"), top1_finetuned=c["accuracy"])
    row["mac_reduction"] = round(o["macs"] / c["macs"], 4)
    for batch in batches:
        lat = report["latency"].get(str(batch))
        if lat is None:
            continue
        row[f"p50_ms_orig_b{batch}"] = lat["original"]["p50_ms"]
        row[f"p50_ms_b{batch}"] = lat["compressed"]["p50_ms"]
        row[f"speedup_b{batch}"] = lat["speedup"]
        row[f"efficiency_b{batch}"] = round(lat["speedup"] / row["mac_reduction"], 4)
    row.update(int8_columns(report, batches))
    row["parity_max_abs_diff"] = report["parity"]["max_abs_diff"]
    row["ort_device"] = report.get("benchmark", {}).get("device")
    row["ort_providers"] = report.get("benchmark", {}).get("providers")
    row.update({f"time_{stage}": seconds for stage, seconds in report["timings"].items()})
    finetune = report.get("finetune") or {}
    if finetune.get("curve"):  # top-1 along the way (--eval-every-minutes): [{minutes, epoch, step, top1}, ...]
        row.update(finetune_epochs=finetune.get("epochs"), finetune_s=finetune.get("seconds"),
                   curve=finetune["curve"])
    return row


def int8_columns(report: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    """The report's INT8 results as flat columns (none when the run did not quantise).

    Per graph (``_orig``: the original's INT8 graph; no suffix: the compressed one's): ``int8_bytes``, ``top1_int8``,
    ``top1_fp32_onnx`` (the fp32 ONNX top-1 it was checked against), ``int8_drop`` (their difference, a fraction),
    ``int8_agreement`` (top-1 agreement with fp32), ``int8_float_nodes`` (nodes kept float). Per batch B:
    ``p50_ms_orig_int8_bB`` and ``p50_ms_int8_bB``, ``speedup_orig_int8_bB`` and ``speedup_int8_bB`` (fp32 original
    p50 / that graph's p50, all four graphs timed interleaved) and ``int8_gain_bB`` (INT8 original p50 / INT8
    compressed p50: what compression adds on top of quantising the original). ``int8_format``: the format chosen.
    """
    q = report.get("int8")
    if not q:
        return {}
    row: dict[str, Any] = {"int8_format": q["format"]["name"]}
    for side, suffix in (("original", "_orig"), ("compressed", "")):
        g = q[side]
        drop = None if g["accuracy"] is None or g["fp32_accuracy"] is None else g["fp32_accuracy"] - g["accuracy"]
        row.update({f"int8_bytes{suffix}": g["onnx_bytes"], f"top1_int8{suffix}": g["accuracy"],
                    f"top1_fp32_onnx{suffix}": g["fp32_accuracy"],
                    f"int8_drop{suffix}": None if drop is None else round(drop, 6),
                    f"int8_agreement{suffix}": g["agreement"], f"int8_float_nodes{suffix}": list(g["excluded"])})
    for batch in batches:
        lat = report["latency"].get(str(batch))
        if lat is None or "int8_gain" not in lat:
            continue
        row[f"p50_ms_orig_int8_b{batch}"] = lat["original.int8"]["p50_ms"]
        row[f"p50_ms_int8_b{batch}"] = lat["compressed.int8"]["p50_ms"]
        row[f"speedup_orig_int8_b{batch}"] = lat["speedups"]["original.int8"]
        row[f"speedup_int8_b{batch}"] = lat["speedups"]["compressed.int8"]
        row[f"int8_gain_b{batch}"] = lat["int8_gain"]
    return row


def load_subset(path: str, n: int | None, seed: int) -> Any:
    """The dataset at ``path``, or ``n`` images of it drawn evenly over the classes (deterministic for ``seed``)."""
    from compressor.data import calibration_subset, load_dataset

    data = load_dataset(path)
    return data if n is None else calibration_subset(data, n, seed=seed)


def compress_options(job: dict[str, Any]) -> dict[str, Any]:
    """The options of :func:`compressor.compress` for a job: the suite's budget, the row's ``round_to``, then the
    model's overrides (e.g. batch 1 only at 224x224)."""
    budget = job["budget"]
    options = dict(arch=job["arch"], normalize=job["normalize"], method=job.get("compress_method", job["method"]),
                   method_options=job.get("method_options") or {}, target=job["target"], target_metric=job["metric"],
                   epochs=budget["epochs"], lr=budget["lr"], batch_size=budget["batch_size"], seed=budget["seed"],
                   device=budget["device"], calib_samples=budget["calib_samples"],
                   bench_batches=tuple(budget["bench_batches"]), bench_repeats=budget["bench_repeats"],
                   threads=budget["threads"], quantize=budget.get("quantize", "none"))
    for key in ("budget_minutes", "eval_every_minutes"):  # budgets that have them (cpu-hour)
        if budget.get(key):
            options[key] = budget[key]
    # explicit, so a suite keeps its meaning whatever the tool's default (distillation became the default later)
    options["distill"] = bool(budget.get("distill", False))
    if job.get("round_to") is not None:
        options["round_to"] = job["round_to"]
    for key, value in (job.get("overrides") or {}).items():
        options[key] = tuple(value) if isinstance(value, list) else value
    return options


def synthetic_data(size: int, n: int, seed: int) -> Any:
    """``n`` seeded uniform-noise uint8 images of ``size`` x ``size`` (labels 0..9, cycling): calibration images
    for a random-weight model whose rows measure latency only."""
    import torch

    from compressor.data import ImageDataset

    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return ImageDataset(x, torch.arange(n) % 10, source=f"seeded noise {size}x{size} (latency only)")


def random_checkpoint(arch: str, seed: int, folder: Path) -> Path:
    """Save the seeded random initialisation of ``arch`` (an ``--arch`` spec) as a state_dict in ``folder``."""
    import torch

    from compressor.io import resolve_arch

    factory, _ = resolve_arch(arch)
    torch.manual_seed(seed)
    path = folder / "random-init.pt"
    torch.save(factory().state_dict(), path)
    return path


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compress one configuration; return its row (without status, wall time and memory)."""
    from compressor import compress

    budget, options = job["budget"], compress_options(job)
    extra: dict[str, Any] = {} if job.get("round_to") is None else {"round_to": job["round_to"]}
    if job.get("synthetic"):
        train = synthetic_data(job["synthetic"]["image_size"], options["calib_samples"], budget["seed"])
        with tempfile.TemporaryDirectory(prefix="bench-random-") as tmp:
            checkpoint = random_checkpoint(job["arch"], budget["seed"], Path(tmp))
            result = compress(checkpoint, data=train, eval_data=None, **options)
        extra.update(latency_only=True, weights=f"random (seed {budget['seed']})", eval_images=0)
    else:
        train = load_subset(job["train"], budget["train_images"], budget["seed"])
        test = load_subset(job["eval"], budget.get("eval_images"), budget["seed"])
        result = compress(job["checkpoint"], data=train, eval_data=test, **options)
        extra["eval_images"] = len(test)
    batches = list(options["bench_batches"])
    return {"train_images": len(train), **extra, **summarise(result.report, batches)}


def _load_average() -> float | None:
    """The machine's 1-minute load average: on a shared machine it says how far wall times can be trusted."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks._child JOB.json ROW.json", file=sys.stderr)
        return 2
    from compressor.errors import CompressorError

    job = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stderr)
    start, load_start = time.perf_counter(), _load_average()
    row: dict[str, Any] = {"key": job["key"], "model": job["model"], "method": job["method"],
                           "target": job["target"], "target_metric": job["metric"]}
    try:
        row.update(run_job(job), status="ok", error=None)
    except CompressorError as exc:
        row.update(status="failed", error=_one_line(exc))
    except Exception as exc:  # noqa: BLE001 - a bug in one configuration must not stop the suite; traceback kept
        traceback.print_exc()
        row.update(status="failed", error=f"{type(exc).__name__}: {_one_line(exc)}")
    row.update(wall_s=round(time.perf_counter() - start, 2), peak_rss_mib=peak_rss_mib(),
               load_1m=[load_start, _load_average()])
    atomic_write_text(Path(argv[1]), json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
