"""Render stored benchmark results (``<results>/<suite>/results.json``) as CSV, docs/RESULTS.md and the README block.

Every number on the generated pages comes from the JSON; nothing is typed by hand. Rendering never runs a model, so
``python -m benchmarks.run --render-only`` rebuilds everything in a second.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._child import atomic_write_text
from ._suites import README_SUITES, SUITE_ORDER

START, END = "<!-- results:start -->", "<!-- results:end -->"
PLOTS = (("top-1 against MACs", "top1_vs_macs"), ("latency against MACs", "latency_vs_macs"),
         ("latency against MACs per precision", "latency_by_precision"),
         ("top-1 against fine-tuning minutes", "top1_vs_minutes"))
LEADING_COLUMNS = ("key", "model", "method", "target", "target_metric", "status", "error", "achieved",
                   "params_orig", "params", "macs_orig", "macs", "mac_reduction", "filters_orig", "filters",
                   "onnx_bytes_orig", "onnx_bytes", "top1_orig", "top1_pruned_stale_bn", "top1_pruned",
                   "top1_finetuned")
TIME_COLUMNS = (("compress", ("time_compress",)), ("BN recalib", ("time_bn_recalib",)),
                ("fine-tune", ("time_finetune",)),
                ("evaluate", ("time_evaluate_original", "time_evaluate_pruned", "time_evaluate_finetuned")),
                ("export + parity", ("time_export", "time_parity")), ("benchmark", ("time_benchmark",)))
CONVENTIONS = (
    ("**target** is the fraction removed of the metric named beside it: the method's default (`filters` for channel "
     "pruning, `params` when a Tucker factorisation is involved; `cmi+tucker` gives half to each step) or `macs`."),
    ("**MAC reduction** is original MACs / compressed MACs; **speedup** is original onnxruntime p50 / compressed p50, "
     "both graphs timed interleaved in the same run; **efficiency** is speedup / MAC reduction (1.0: every removed "
     "MAC became saved time; below 1: the runtime did not turn the removed MACs into time)."),
    ("**top-1** is on the evaluation data: before compression; after compression (BatchNorm statistics as "
     "inherited, then recalibrated on training images); after fine-tuning. Every configuration of a suite "
     "fine-tunes with the same budget (seed, epochs, learning rate, training subset)."),
    ("**peak MiB** is the peak resident memory of the configuration's own process (it includes the interpreter, "
     "torch and the training set held in memory); times are wall seconds of that process's stages."),
)


def readme_suite(stored: dict[str, dict[str, Any]], wanted: str | None) -> str | None:
    """The suite the README shows: ``wanted``, else the first of ``README_SUITES`` stored (None: leave it alone)."""
    if wanted is not None:
        if wanted not in stored:
            raise SystemExit(f"--readme-suite {wanted}: no {wanted}/results.json stored; run that suite first")
        return wanted
    return next((name for name in README_SUITES if name in stored), None)


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every stored suite under ``results_dir``, known suites first (``SUITE_ORDER``), then by name."""
    found = {p.parent.name: p for p in sorted(results_dir.glob("*/results.json"))}
    order = [s for s in SUITE_ORDER if s in found] + sorted(set(found) - set(SUITE_ORDER))
    return {name: json.loads(found[name].read_text()) for name in order}


def csv_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The leading columns, then every other key in the order first seen."""
    seen = dict.fromkeys(LEADING_COLUMNS)
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_csv(results: dict[str, Any], path: Path) -> Path:
    rows = results["rows"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
    return path


# -- formatting ----------------------------------------------------------------------------------------------------

def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def millions(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f} M"


def thousands(value: int | None) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def kib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1024:,.0f}"


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def ratio(value: float | None, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def duration(total: float | None) -> str:
    if total is None:
        return "n/a"
    minutes, secs = divmod(round(total), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def label(row: dict[str, Any]) -> str:
    """The row's method, with its ``--round-to`` when the row set one (``l1`` r16)."""
    align = row.get("round_to")
    return f"`{row['method']}`" + ("" if align is None else f" r{align}")


def target_label(row: dict[str, Any]) -> str:
    metric = row.get("target_metric") or "default"
    return f"{row['target']:g} of {'MACs' if metric == 'macs' else metric}"


def table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows]


def batches(rows: list[dict[str, Any]]) -> list[int]:
    found = {int(k[len("speedup_b"):]) for r in rows for k in r if k.startswith("speedup_b")}
    return sorted(found)


def by_model(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    models: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        models.setdefault(row["model"], []).append(row)
    return models


def _stage_time(row: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    values = [row[k] for k in keys if row.get(k) is not None]
    return sum(values) if values else None


# -- the results page ----------------------------------------------------------------------------------------------

def size_table(rows: list[dict[str, Any]]) -> list[str]:
    body = [[label(r), target_label(r), ratio(r["achieved"]), thousands(r["params"]), millions(r["macs"]),
             ratio(r["mac_reduction"], "×"), thousands(r["filters"]), kib(r["onnx_bytes"]),
             pct(r.get("top1_pruned_stale_bn")), pct(r["top1_pruned"]), pct(r["top1_finetuned"])] for r in rows]
    return table(["method", "target", "achieved", "params", "MACs", "MAC reduction", "filters", "ONNX KiB",
                   "top-1 % compressed", "top-1 % BN recalibrated", "top-1 % fine-tuned"],
                  ["---", "---"] + ["---:"] * 9, body)


def speed_table(rows: list[dict[str, Any]]) -> list[str]:
    sizes = batches(rows)
    header, align = ["method", "target"], ["---", "---"]
    for b in sizes:
        header += [f"p50 ms b{b} original → compressed", f"speedup b{b}", f"efficiency b{b}"]
        align += ["---:", "---:", "---:"]
    header += [f"{name} s" for name, _ in TIME_COLUMNS] + ["total s", "peak MiB"]
    align += ["---:"] * (len(TIME_COLUMNS) + 2)
    body = []
    for r in rows:
        cells = [label(r), target_label(r)]
        for b in sizes:
            orig, comp = r.get(f"p50_ms_orig_b{b}"), r.get(f"p50_ms_b{b}")
            cells += ["n/a" if orig is None else f"{orig:.3f} → {comp:.3f}", ratio(r.get(f"speedup_b{b}"), "×"),
                      ratio(r.get(f"efficiency_b{b}"))]
        cells += [seconds(_stage_time(r, keys)) for _, keys in TIME_COLUMNS]
        cells += [seconds(r.get("wall_s")), f"{r['peak_rss_mib']:,.0f}"]
        body.append(cells)
    return table(header, align, body)


def original_line(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    top1 = (f"{r.get('weights')} weights: latency only" if r.get("latency_only")
            else f"top-1 {pct(r['top1_orig'])}%")
    return (f"Original: {thousands(r['params_orig'])} params, {millions(r['macs_orig'])} MACs, "
            f"{thousands(r['filters_orig'])} filters, ONNX {kib(r['onnx_bytes_orig'])} KiB, {top1}.")


def budget_line(meta: dict[str, Any]) -> str:
    b = meta["budget"]
    images = "the whole training set" if b["train_images"] is None else (
        f"{b['train_images']:,} training images (class-balanced subset, seed {b['seed']})")
    threads = f"{b['threads']} thread(s)" if b["threads"] else "onnxruntime's default threads (one per physical core)"
    epochs = f"{b['epochs']} epoch" + ("" if b["epochs"] == 1 else "s")
    if b.get("budget_minutes"):  # --budget-minutes: as many epochs as fit (cpu-hour)
        every = b.get("eval_every_minutes")
        epochs = (f"for {b['budget_minutes']:g} minutes of wall clock (--budget-minutes, schedule fitted to the time"
                  + (f"; top-1 recorded every {every:g} min of training, those evaluations not counted" if every
                     else "") + ")")
    if b.get("distill"):
        epochs += " with distillation from the original (--distill)"
    evaluated = "all evaluation images" if b.get("eval_images") is None else (
        f"{b['eval_images']:,} evaluation images (class-balanced subset)")
    sizes = ", ".join(map(str, b["bench_batches"]))
    return (f"fine-tuning {epochs} on {images}, SGD lr {b['lr']:g} with a cosine schedule, batch "
            f"{b['batch_size']}, device {b['device']}, seed {b['seed']}; {b['calib_samples']} calibration images; "
            f"top-1 on {evaluated}; onnxruntime p50 over {b['bench_repeats']} repeats at batch {sizes}, {threads}"
            + ("" if b.get("quantize", "none") == "none" else f"; INT8 of both graphs (--quantize {b['quantize']})"))


def machine_line(meta: dict[str, Any]) -> str:
    m = meta.get("machine", {})
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{m.get('cpu_model') or m.get('processor')}, {m.get('cpu_count')} logical CPUs{gpu}, {m.get('platform')}"


def load_note(rows: list[dict[str, Any]]) -> str:
    """The range of the 1-minute load average seen by the configurations (wall times scale with it)."""
    loads = [v for r in rows for v in r.get("load_1m") or [] if v is not None]
    if not loads:
        return ""
    return f"; 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the run (wall times grow with it)"


def data_line(model: str, data: dict[str, Any]) -> str:
    """A model's checkpoint and data, and the budget options it overrides (random-weight models)."""
    line = f"{model}: `{data['checkpoint']}`, train `{data['train']}`, eval `{data['eval']}`"
    overrides = data.get("overrides")
    if overrides:
        line += " (instead of the budget's: " + ", ".join(f"{k} {v}" for k, v in overrides.items()) + ")"
    return line


def versions_line(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items() if v)


def invocations_lines(meta: dict[str, Any]) -> list[str]:
    """One line per invocation when ``--resume`` assembled the rows from several (empty for a single run)."""
    runs = meta.get("invocations") or []
    if len(runs) < 2:
        return []
    return ["- Assembled by --resume from " + "; ".join(
        f"`{r.get('command')}` (started {r.get('started')}, {duration(r.get('duration_s'))}, "
        f"{r.get('configurations_run')} configurations, git `{r.get('git')}`)" for r in runs) + "."]


def suite_section(name: str, results: dict[str, Any], docs_dir: Path, suite_dir: Path,
                  stored: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The page's section of one suite; ``stored`` (every suite) lets the cpu-hour sections check issue 13's
    targets across the screen and the hour."""
    from . import _hour_render, _int8_render  # they build on this module's helpers

    meta, rows = results["meta"], results["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    state = "" if meta.get("complete") else " (incomplete: interrupted)"
    lines = [f"## Suite `{name}`", "", meta["description"] + ".", "",
             f"- Command: `{meta['command']}`",
             (f"- Run: started {meta['started']}, took {duration(meta.get('duration_s'))}{state}; {len(rows)} "
              f"configurations, {len(ok)} ok, {len(failed)} failed; git `{meta.get('git')}`."),
             *invocations_lines(meta),
             f"- Machine: {machine_line(meta)}{load_note(rows)}.",
             f"- Versions: {versions_line(meta)}.",
             f"- Budget, the same for every configuration: {budget_line(meta)}.",
             "- Data: " + "; ".join(data_line(m, d) for m, d in meta.get("data", {}).items()) + "."]
    lines += [f"- Note: {note}." for note in meta.get("notes", [])]
    if name == "deploy":
        lines += [""] + _int8_render.targets_section(rows)
    if name in (_hour_render.SCREEN, _hour_render.HOUR):
        lines += [""] + _hour_render.section(name, {**(stored or {}), name: results})
    for model, model_rows in by_model(rows).items():
        good = [r for r in model_rows if r["status"] == "ok"]
        lines += ["", f"### {name}: {model}", ""]
        if good:
            lines += [original_line(good), ""]
            plots = [(what, suite_dir / f"{stem}-{model}.png") for what, stem in PLOTS]
            shown = [f"![{what}]({Path(os.path.relpath(p, docs_dir)).as_posix()})" for what, p in plots if p.exists()]
            if shown:
                lines += [" ".join(shown), ""]
            lines += size_table(good) + [""] + speed_table(good)
            int8 = _int8_render.int8_tables(good)
            lines += [""] + int8 if int8 else []
        bad = [r for r in model_rows if r["status"] != "ok"]
        if bad:
            lines += ["", "Failed:", ""] + [f"- {label(r)} at {target_label(r)}: {r['error']}" for r in bad]
    return lines


def _median(values: list[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def efficiency_section(stored: dict[str, dict[str, Any]], results_dir: Path) -> list[str]:
    """What raises the speedup efficiency: channel rounding and threads (``benchmarks/round_to.py``'s JSON files in
    ``results_dir``, when present) and batch size and method family (the suites' rows)."""
    lines = ["## What raises the speedup efficiency", ""]
    studies = [(json.loads(p.read_text()), p.name) for p in (results_dir / "round_to_t1.json",
                                                             results_dir / "round_to.json") if p.exists()]
    if studies:
        lines += [("**Channel rounding and threads** (`python -m benchmarks.round_to [--threads 1]`: ResNet-56, `l1`, "
                   "`--target 0.33`, no fine-tuning; each row's original and pruned graphs timed interleaved):"), "",
                  "| threads | `--round-to` | MACs kept | speedup b1 | speedup b32 | efficiency b1 | efficiency b32 |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for study, name in studies:
            for r in study["rows"]:
                kept = r["macs_ratio"]
                lines.append(f"| {study.get('threads') or 'default'} | {r['round_to']} | {kept:.1%} | "
                             f"{r['speedup_b1']:.2f}× | {r['speedup_b32']:.2f}× | {r['speedup_b1'] * kept:.2f} | "
                             f"{r['speedup_b32'] * kept:.2f} |")
        pairs = [(study.get("threads"), r) for study, _ in studies for r in study["rows"]]
        best = max(pairs, key=lambda tr: tr[1]["speedup_b1"] + tr[1]["speedup_b32"])
        effs = [r[f"speedup_b{b}"] * r["macs_ratio"] for _, r in pairs for b in (1, 32)]
        lines += ["", (f"The largest speedup came at `--round-to {best[1]['round_to']}` ({best[0] or 'default'} "
                       f"thread(s): {best[1]['speedup_b1']:.2f}× at batch 1, {best[1]['speedup_b32']:.2f}× at 32); "
                       "onnxruntime's CPU convolutions work on blocks of 8 or 16 channels (NCHWc), so other counts "
                       f"pay for padding. Efficiency stays between {min(effs):.2f} and {max(effs):.2f} whatever the "
                       "rounding: these small layers are bound by memory traffic more than by arithmetic."), ""]
    for name, results in stored.items():
        rows = [r for r in results["rows"] if r["status"] == "ok"]
        sizes = results["meta"]["budget"]["bench_batches"]
        if not rows or len(sizes) < 2:
            continue
        lines += [f"**Batch size and method** (suite `{name}`, median efficiency over its rows):", "",
                  "| method | rows | " + " | ".join(f"efficiency b{b}" for b in sizes) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            cells = [_median([r.get(f"efficiency_b{b}") for r in mine]) for b in sizes]
            lines.append(f"| `{method}` | {len(mine)} | " + " | ".join(ratio(c) for c in cells) + " |")
        lines.append("")
    return lines if len(lines) > 2 else []


def results_page(stored: dict[str, dict[str, Any]], docs: Path, results_dir: Path) -> str:
    lines = ["# Benchmark results", "",
             ("<!-- Generated by `python -m benchmarks.run` from benchmarks/results/<suite>/results.json: do not "
              "edit. `python -m benchmarks.run --render-only` rebuilds this page, the plots and the README block. -->"),
             "",
             ("Every number below was measured by the harness (`benchmarks/run.py`); the raw rows are in "
              "`results.json` and `results.csv` beside the plots."),
             ""]
    lines += [f"- {c}" for c in CONVENTIONS]
    for name, results in stored.items():
        lines += [""] + suite_section(name, results, docs.parent.resolve(), (results_dir / name).resolve(), stored)
    study = efficiency_section(stored, results_dir)
    if study:
        lines += [""] + study
    return "\n".join(lines).rstrip("\n") + "\n"


#: A section another benchmark script writes into the page (``benchmarks/imp_lmc.py``, ``benchmarks/slt.py``):
#: ``<!-- NAME:start -->`` ... ``<!-- NAME:end -->`` (``begin`` accepted for ``start``); kept on every re-render.
KEPT_SECTION = re.compile(r"^<!-- (?P<name>[\w-]+):(?:start|begin) -->$.*?^<!-- (?P=name):end -->$",
                          re.MULTILINE | re.DOTALL)


def kept_sections(page: str) -> list[str]:
    """The sections of an existing results page that other scripts own, in page order."""
    return [m.group(0) for m in KEPT_SECTION.finditer(page)]


def write_results_page(stored: dict[str, dict[str, Any]], docs: Path, results_dir: Path) -> Path:
    """Rebuild the page from the stored suites, keeping the sections other benchmark scripts wrote into it."""
    page = results_page(stored, docs, results_dir)
    kept = kept_sections(docs.read_text()) if docs.exists() else []
    atomic_write_text(docs, page + "".join(f"\n{section}\n" for section in kept))
    return docs


# -- the README block ----------------------------------------------------------------------------------------------

def readme_block(name: str, results: dict[str, Any], link: str) -> str:
    meta, rows = results["meta"], results["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    widest = max(batches(ok) or [0])
    lines = [(f"Measured by the benchmark harness, suite `{name}` (`{meta['command']}`); full tables, per-stage "
              f"timings, memory, failures and plots: [{link}]({link}). Budget: {budget_line(meta)}. "
              f"Machine: {machine_line(meta)}."), ""]
    for model, model_rows in by_model(ok).items():
        r0 = model_rows[0]
        lines += [(f"**{model}** (original: {millions(r0['macs_orig'])} MACs, {thousands(r0['params_orig'])} "
                   f"params, top-1 {pct(r0['top1_orig'])}%)"), ""]
        sizes = batches(model_rows)
        header = ["method", "target", "MAC reduction", "top-1 % pruned → fine-tuned"] + [
            f"speedup b{b}" for b in sizes] + [f"efficiency b{widest}"]
        body = [[f"`{r['method']}`", target_label(r), ratio(r["mac_reduction"], "×"),
                 f"{pct(r['top1_pruned'])} → {pct(r['top1_finetuned'])}"]
                + [ratio(r.get(f"speedup_b{b}"), "×") for b in sizes] + [ratio(r.get(f"efficiency_b{widest}"))]
                for r in model_rows]
        lines += table(header, ["---", "---"] + ["---:"] * (len(header) - 2), body) + [""]
    failed = len(rows) - len(ok)
    if failed:
        lines += [f"{failed} configuration(s) failed (e.g. a target the method cannot reach); see {link}.", ""]
    return "\n".join(lines).rstrip("\n")


def write_readme_block(name: str, results: dict[str, Any], readme: Path, docs: Path) -> Path:
    """Replace the text between the README's results markers with suite ``name``'s summary."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers; add them where the results belong")
    link = Path(os.path.relpath(docs.resolve(), readme.resolve().parent)).as_posix()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{START}\n{readme_block(name, results, link)}\n{END}{tail}")
    return readme
