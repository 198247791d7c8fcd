"""PNG plots of a stored suite: top-1 against MACs and onnxruntime latency against MACs, one plot per model.

Each method (with its ``--round-to`` when the row set one) is one curve through its successful configurations (sorted
by MACs); the original model is a black star. Latency is plotted relative to the original timed in the same run
(1 / speedup), beside the line where latency would fall in proportion to MACs: a point above that line has
efficiency below 1. Rows that quantised also get ``latency_by_precision-<model>.png``: fp32 and INT8 latency of the
original and the compressed graphs against MACs, all relative to the fp32 original of the same run. Rows that
recorded top-1 along the fine-tuning (``curve``, the cpu-hour suites) get ``top1_vs_minutes-<model>.png``.
Needs matplotlib (the ``bench`` extra); :mod:`benchmarks.run` checks for it before running anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # after choosing the backend

from ._child import default_file_mode
from ._hour_render import group
from ._int8_render import has_int8, int8_batches
from ._render import batches, by_model

MARKERS = "osD^v<>Pp*hX"


def _save(fig: Any, path: Path) -> Path:
    """Save atomically: render to a temporary file beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def _curves(rows: list[dict[str, Any]], y_key: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per method, (MACs in millions, y) sorted by MACs, from the rows that have ``y_key``."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(y_key) is not None:
            name = row["method"] + ("" if row.get("round_to") is None else f" r{row['round_to']}")
            curves.setdefault(name, []).append((row["macs"] / 1e6, row[y_key]))
    return {m: ([x for x, _ in sorted(p)], [y for _, y in sorted(p)]) for m, p in curves.items()}


def plot_top1(rows: list[dict[str, Any]], model: str, suite: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (method, (x, y)) in enumerate(_curves(rows, "top1_finetuned").items()):
        ax.plot(x, [100 * v for v in y], marker=MARKERS[i % len(MARKERS)], label=method)
    first = rows[0]
    if first.get("top1_orig") is not None:
        ax.plot([first["macs_orig"] / 1e6], [100 * first["top1_orig"]], "k*", markersize=12, label="original")
    ax.set(xlabel="MACs per image (millions)", ylabel="top-1 after fine-tuning (%)",
           title=f"{model}: top-1 against MACs ({suite} suite)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _relative_latency(rows: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Rows with ``rel`` = compressed p50 / original p50, both timed in that row's own run: absolute times of
    different rows are not comparable on a shared machine, their ratios are."""
    return [{**r, "rel": 1.0 / r[f"speedup_b{batch}"]} for r in rows if r.get(f"speedup_b{batch}")]


def plot_latency(rows: list[dict[str, Any]], model: str, suite: str, path: Path) -> Path:
    sizes = batches(rows) or [1]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.2), squeeze=False)
    macs_orig = rows[0]["macs_orig"] / 1e6
    for ax, batch in zip(axes[0], sizes):
        for i, (method, (x, y)) in enumerate(_curves(_relative_latency(rows, batch), "rel").items()):
            ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], label=method)
        ax.plot([0, macs_orig], [0, 1], "k:", linewidth=1, label="proportional to MACs")
        ax.plot([macs_orig], [1.0], "k*", markersize=12, label="original")
        ax.set(xlabel="MACs per image (millions)", ylabel="p50 latency / original p50 (same run)",
               title=f"onnxruntime, batch {batch}")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{model}: latency against MACs ({suite} suite)")
    return _save(fig, path)


def _precision_panel(ax: Any, rows: list[dict[str, Any]], batch: int, precision: str) -> None:
    """One panel: p50 / fp32 original p50 (same run) against MACs, for one precision; originals as stars."""
    key = f"speedup_int8_b{batch}" if precision == "INT8" else f"speedup_b{batch}"
    for i, (name, (x, y)) in enumerate(_curves([{**r, "rel": 1.0 / r[key]} for r in rows if r.get(key)],
                                               "rel").items()):
        ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], linestyle="none", label=name)
    macs_orig = rows[0]["macs_orig"] / 1e6
    origin = [1.0 / r[f"speedup_orig_int8_b{batch}"] for r in rows if r.get(f"speedup_orig_int8_b{batch}")]
    level = 1.0 if precision == "fp32" else (sum(origin) / len(origin) if origin else None)
    if level is not None:
        ax.plot([0, macs_orig], [0, level], "k:", linewidth=1, label="proportional to MACs")
        ax.plot([macs_orig], [level], "k*", markersize=12, label=f"original {precision}")
    ax.set(xlabel="MACs per image (millions)", ylabel="p50 / fp32 original p50 (same run)",
           title=f"{precision}, batch {batch}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def plot_precisions(rows: list[dict[str, Any]], model: str, suite: str, path: Path) -> Path:
    """fp32 (top) and INT8 (bottom) latency against MACs, one column per batch size; the INT8 original is the
    mean over the rows of its p50 relative to the fp32 original."""
    sizes = int8_batches(rows) or [1]
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.2 * len(sizes), 8.0), squeeze=False, sharey="col")
    for column, batch in enumerate(sizes):
        for line, precision in enumerate(("fp32", "INT8")):
            _precision_panel(axes[line][column], rows, batch, precision)
    fig.suptitle(f"{model}: latency against MACs per precision ({suite} suite)")
    fig.subplots_adjust(hspace=0.3)
    handles = {}  # one legend beside the panels, so that it hides no point
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.92, 0.5), fontsize="small")
    return _save(fig, path)


def plot_minutes(rows: list[dict[str, Any]], model: str, suite: str, path: Path) -> Path:
    """Top-1 against minutes of fine-tuning, one line per row with a ``curve`` (``--eval-every-minutes``): the
    first point (0 min) is the row's top-1 before fine-tuning, the last its final top-1; our methods solid, the tp-*
    criteria dashed, the baselines dotted; the original is a black dashed line."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for i, row in enumerate(r for r in rows if r.get("curve")):
        points = [(0.0, row.get("top1_pruned"))] + [(p["minutes"], p["top1"]) for p in row["curve"]]
        x = [m for m, t in points if t is not None]
        y = [100 * t for _, t in points if t is not None]
        name = row["method"] + ("" if row.get("round_to") is None else f" r{row['round_to']}")
        style = {"ours": "-", "tp-*": "--"}.get(group(row["method"]), ":")  # ours solid, tp-* dashed, baselines dotted
        ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], markersize=4, linestyle=style, label=name)
    first = rows[0]
    if first.get("top1_orig") is not None:
        ax.axhline(100 * first["top1_orig"], color="k", linestyle="--", linewidth=1, label="original")
    ax.set(xlabel="minutes of fine-tuning (wall clock, one core)", ylabel="top-1 (%)",
           title=f"{model}: top-1 against fine-tuning minutes ({suite} suite)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right", ncol=2)
    return _save(fig, path)


def plot_suite(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """The plots of every model of a stored suite that has at least one successful row (top-1 only where the
    model's top-1 means something, per precision only where the rows quantised)."""
    suite = results["meta"]["suite"]
    written = []
    for model, rows in by_model([r for r in results["rows"] if r["status"] == "ok"]).items():
        if any(r.get("top1_finetuned") is not None for r in rows):
            written.append(plot_top1(rows, model, suite, out_dir / f"top1_vs_macs-{model}.png"))
        written.append(plot_latency(rows, model, suite, out_dir / f"latency_vs_macs-{model}.png"))
        if has_int8(rows):
            written.append(plot_precisions(rows, model, suite, out_dir / f"latency_by_precision-{model}.png"))
        if any(r.get("curve") for r in rows):
            written.append(plot_minutes(rows, model, suite, out_dir / f"top1_vs_minutes-{model}.png"))
    return written
