"""The report: one JSON-friendly dict, rendered as markdown and as a terminal table.

Schema (``report.json``), every number measured in the run that wrote it:

* ``original`` / ``compressed``: ``params``, ``macs``, ``filters``, ``onnx_bytes``, ``onnx_deflated_bytes`` (after
  zlib deflate), ``accuracy`` (top-1 on the eval
  data, or null without it); ``compressed`` adds ``accuracy_before_finetune`` (after BatchNorm recalibration) and
  ``accuracy_before_bn_recalib`` (straight after compression; null when no recalibration ran);
* ``parity``: ``max_abs_diff``, ``top1_agreement``, ``n_samples``, ``atol`` (compressed model, PyTorch vs onnxruntime);
* ``latency``: keyed by batch size, each with ``original`` and ``compressed`` (``p50_ms``, ``p90_ms``, ``p99_ms``, ...)
  and ``speedup`` (original p50 / compressed p50); ``benchmark`` holds providers read back, threads, versions;
* ``timings``: seconds per stage; ``layers``: channels before/after per conv/linear layer;
* ``method``: what the method chose (keep counts, achieved ratio, method-specific facts);
* ``options``, ``versions``, ``conventions``.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from dataclasses import asdict
from importlib import metadata
from typing import Any

from torch import nn

MAC_CONVENTION = (
    "MACs: one multiply-accumulate per weight per output position, Conv2d and Linear layers only, for one image "
    "(BatchNorm, activations, pooling and additions are not counted)"
)
TARGET_CONVENTION = (
    "target: fraction removed; filters = output channels summed over all Conv2d layers"
)


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shaped the result."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("compressor", "torch", "torch-pruning", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                 "tensorly", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def machine() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}


def method_section(compressed: Any, method_report: Mapping[str, Any], cfg: Any, *, achieved: float,
                   bn_recalib_images: int | None) -> dict[str, Any]:
    """The ``method`` section: name, target, metric, what was achieved, the stages run, the method's typed options
    and what the method itself reported (its own keys, e.g. ``groups`` and ``cmi``)."""
    method = compressed.method
    section: dict[str, Any] = {
        "name": cfg.method, "target": compressed.target, "target_metric": cfg.target_metric or method.default_metric,
        "achieved": achieved, "stages": compressed.stages, "at_init": cfg.at_init,
        "options": method_options(method), **method_report,
    }
    if bn_recalib_images is not None:
        section["bn_recalib_images"] = bn_recalib_images
    return section


def method_options(method: Any) -> dict[str, Any]:
    """``{method name: {option: value}}`` for a method, or for each step of a chain (and the chain's own)."""
    steps = getattr(method, "steps", [])
    out = {s.name: asdict(s.options) for s in steps} if steps else {}
    out[method.name] = asdict(method.options)
    return {k: v for k, v in out.items() if v}


def assemble(*, tool: dict[str, Any], model: dict[str, Any], method: dict[str, Any], original: dict[str, Any],
             compressed: dict[str, Any], parity: dict[str, Any], int8: dict[str, Any] | None, bench: Any,
             trained: Any, cfg: Any, watch: Any, layers: list[dict[str, Any]],
             reconstruction: dict[str, Any] | None = None,
             distributed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report, from the sections each stage contributed (see the module docstring for the schema)."""
    result = getattr(trained, "result", None)
    return {
        "tool": tool, "model": model, "method": method, "original": original, "compressed": compressed,
        "reconstruction": reconstruction or {"skipped": "not run"},
        "parity": parity,
        "int8": int8,
        "latency": bench.latency if bench is not None else {},
        "benchmark": bench.details if bench is not None else {},
        "finetune": {"epochs": getattr(result, "epochs", cfg.epochs), "budget_minutes": cfg.budget_minutes,
                     "distill": cfg.distills if cfg.trains else None,
                     "seconds": getattr(result, "seconds", None), "device": getattr(result, "device", None),
                     "amp": getattr(result, "amp", None), "history": list(getattr(result, "history", []) or []),
                     "eval_every_minutes": getattr(cfg, "eval_every_minutes", None),
                     "curve": list(getattr(result, "curve", []) or [])},
        "distributed": distributed or {"world_size": 1},
        "timings": dict(watch.timings),
        "layers": layers,
        "options": cfg.to_dict(),
        "conventions": {"macs": MAC_CONVENTION, "target": TARGET_CONVENTION,
                        "accuracy": "top-1 on --eval-data, fraction in [0, 1]"},
        "versions": versions(),
        "machine": machine(),
    }


def layer_table(before: nn.Module, after: nn.Module) -> list[dict[str, Any]]:
    """Channels in/out per Conv2d/Linear layer of ``before``, matched by module name in ``after``.

    A layer replaced by a factorised block (Tucker-2: ``reduce`` -> ``core`` -> ``restore``) reports the block's
    outer channels and ``ranks`` ``[r_out, r_in]`` (the core's output and input channels); other rows have no ranks.
    """
    after_modules = dict(after.named_modules())
    rows = []
    for name, module in before.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        replaced = after_modules.get(name)
        inner = [m for m in replaced.modules() if isinstance(m, (nn.Conv2d, nn.Linear))] if replaced else []
        first, last = (inner[0], inner[-1]) if inner else (None, None)
        core = getattr(replaced, "core", None) if len(inner) > 1 else None
        rows.append({
            "name": name,
            "type": type(module).__name__,
            "in_before": _channels(module, "in"),
            "in_after": _channels(first, "in"),
            "out_before": _channels(module, "out"),
            "out_after": _channels(last, "out"),
            "ranks": [core.out_channels, core.in_channels] if isinstance(core, nn.Conv2d) else None,
        })
    return rows


def _channels(module: nn.Module | None, side: str) -> int | None:
    if module is None:
        return None
    attr = {"in": ("in_channels", "in_features"), "out": ("out_channels", "out_features")}[side]
    return getattr(module, attr[0], getattr(module, attr[1], None))


def to_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"


def _fmt_int(n: Any) -> str:
    return "n/a" if n is None else f"{int(n):,}"


def _fmt_acc(a: Any) -> str:
    return "n/a" if a is None else f"{100 * float(a):.2f}%"


def _ratio(before: Any, after: Any) -> str:
    """Relative change, signed: ``-33.0%`` for a reduction, ``+138.8%`` for growth (a factorisation's extra convs)."""
    if not before or after is None:
        return ""
    return f"{100 * (after / before - 1):+.1f}%"


def _speed(speedup: float) -> str:
    """``1.30x faster``, or for a compressed model that runs slower, ``1.49x slower`` (never ``0.67x faster``)."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, original, compressed, change) rows shared by the markdown and terminal renderings."""
    o, c = report["original"], report["compressed"]
    rows = [
        ("params", _fmt_int(o["params"]), _fmt_int(c["params"]), _ratio(o["params"], c["params"])),
        ("MACs", _fmt_int(o["macs"]), _fmt_int(c["macs"]), _ratio(o["macs"], c["macs"])),
        ("filters", _fmt_int(o["filters"]), _fmt_int(c["filters"]), _ratio(o["filters"], c["filters"])),
        ("ONNX bytes", _fmt_int(o["onnx_bytes"]), _fmt_int(c["onnx_bytes"]), _ratio(o["onnx_bytes"], c["onnx_bytes"])),
    ]
    if o.get("onnx_deflated_bytes") and c.get("onnx_deflated_bytes"):
        o_z, c_z = o["onnx_deflated_bytes"], c["onnx_deflated_bytes"]
        rows.append(("ONNX bytes, deflated", _fmt_int(o_z), _fmt_int(c_z), _ratio(o_z, c_z)))
    acc_change = ""
    if o["accuracy"] is not None and c["accuracy"] is not None:
        acc_change = f"{100 * (c['accuracy'] - o['accuracy']):+.2f} pts"
    recalibrated = c.get("accuracy_before_bn_recalib") is not None
    if recalibrated:
        rows.append(("top-1 (compressed, stale BN statistics)", _fmt_acc(o["accuracy"]),
                     _fmt_acc(c["accuracy_before_bn_recalib"]), ""))
    if c.get("accuracy_before_finetune") is not None and report.get("finetune", {}).get("epochs"):
        label = "BN recalibrated, before fine-tune" if recalibrated else "before fine-tune"
        rows.append((f"top-1 ({label})", _fmt_acc(o["accuracy"]), _fmt_acc(c["accuracy_before_finetune"]), ""))
    rows.append(("top-1", _fmt_acc(o["accuracy"]), _fmt_acc(c["accuracy"]), acc_change))
    for batch, lat in report.get("latency", {}).items():
        rows.append((f"ORT p50 ms (batch {batch})", f"{lat['original']['p50_ms']:.3f}",
                     f"{lat['compressed']['p50_ms']:.3f}", _speed(lat["speedup"])))
    return rows + int8_rows(report)


def int8_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """INT8 original (the alternative a user would ship) vs INT8 compressed: what compression adds on top."""
    q = report.get("int8")
    if not q:
        return []
    o, c = q["original"], q["compressed"]
    failed = [side for side in ("original", "compressed") if q[side].get("failed")]
    if failed:
        return [("INT8", "failed check" if "original" in failed else "ok",
                 "failed check" if "compressed" in failed else "ok", "not shipped (see report.md)")]
    change = f"{100 * (c['accuracy'] - o['accuracy']):+.2f} pts" if None not in (o["accuracy"], c["accuracy"]) else ""
    rows = [("INT8 ONNX bytes", _fmt_int(o["onnx_bytes"]), _fmt_int(c["onnx_bytes"]),
             _ratio(o["onnx_bytes"], c["onnx_bytes"])),
            ("INT8 top-1", _fmt_acc(o["accuracy"]), _fmt_acc(c["accuracy"]), change)]
    for batch, lat in report.get("latency", {}).items():
        if "int8_gain" in lat:
            rows.append((f"INT8 ORT p50 ms (batch {batch})", f"{lat['original.int8']['p50_ms']:.3f}",
                         f"{lat['compressed.int8']['p50_ms']:.3f}", _speed(lat["int8_gain"])))
    return rows


GRAPHS = (("original", "original fp32"), ("original.int8", "original INT8"), ("compressed", "compressed fp32"),
          ("compressed.int8", "compressed INT8"))


def deployment_lines(report: Mapping[str, Any]) -> list[str]:
    """The 2x2 (fp32/INT8 x original/compressed) markdown table: bytes, top-1, p50 and speed-up over fp32 original."""
    q, latency = report.get("int8"), report.get("latency", {})
    if not q:
        return []
    batches = list(latency)
    lines = ["", "## Deployment: fp32 and INT8, original and compressed", "",
             f"INT8: onnxruntime quantize_static, QDQ, {q['format']['name']} (format chosen by timing on this "
             f"machine: {_scalars(q.get('format_choice', {}))}).", "",
             "| graph | ONNX bytes | top-1 | " + " | ".join(f"p50 ms b{b} (speed-up)" for b in batches) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in batches) + " |"]
    for key, label in GRAPHS:
        side = key.split(".")[0]
        facts = q[side] if key.endswith("int8") else report[side]
        if facts.get("failed"):
            lines.append(f"| {label} | failed its check, not shipped | | " + " | ".join("" for _ in batches) + " |")
            continue
        cells = []
        for b in batches:
            speed = latency[b]["speedups"].get(key, 1.0) if key != "original" else 1.0
            cells.append(f"{latency[b][key]['p50_ms']:.3f} ({speed:.2f}x)")
        lines.append(f"| {label} | {_fmt_int(facts['onnx_bytes'])} | {_fmt_acc(facts['accuracy'])} | "
                     + " | ".join(cells) + " |")
    for side in ("original", "compressed"):
        lines.append("")
        if q[side].get("failed"):
            lines.append(f"{side} INT8: {q[side]['failed']}")
            continue
        kept = q[side]["excluded"]
        lines.append(f"{side} INT8: top-1 agreement with fp32 {100 * q[side]['agreement']:.1f}%; "
                     + (f"kept in float: {', '.join(kept)}." if kept else "every Conv/Gemm quantised."))
    return lines


def reconstruction_lines(section: Mapping[str, Any] | None) -> list[str]:
    """One paragraph: how many layers were refitted and their output error before and after (or why not)."""
    if not section:
        return []
    if "skipped" in section:
        return ["", f"Reconstruction: skipped ({section['skipped']})."]
    rows = section["layers"]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / max(1, len(rows))

    return ["", "## Reconstruction", "", f"{section['refitted']} of {len(rows)} layers that lost input channels "
            f"refitted by least squares on calibration images ({section['positions']} pixels per image, ridge "
            f"{section['ridge']:g}, {section['seconds']:.1f} s); mean relative output error "
            f"{mean('error_before'):.3f} -> {mean('error_after'):.3f}."]


def distributed_lines(section: Mapping[str, Any] | None) -> list[str]:
    """The markdown lines of a distributed run (none for one process)."""
    if not section or section.get("world_size", 1) <= 1:
        return []
    return ["", "## Distributed fine-tuning", "",
            f"{section['world_size']} processes ({section['backend']}), {section['per_rank_batch']} images per process "
            f"per step, global batch {section['global_batch']}; learning rate {section['lr']:g} -> "
            f"{section['lr_scaled']:g} by {section['lr_rule']}; SyncBatchNorm: "
            f"{'yes' if section['sync_batchnorm'] else 'no'}. Distributed: {section['distributed']}; rank 0 only: "
            f"{section['rank 0 only']}."]


def to_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable report.md: summary, parity, latency details, per-layer channels, options, versions."""
    method = report["method"]
    lines = [
        f"# compressor report: `{method['name']}` on `{report['model']['arch']}`",
        "",
        f"Model `{report['model']['path']}`; target {method['target']} of {method['target_metric']} removed, "
        f"achieved {method['achieved']:.4f}.",
        "",
        "| metric | original | compressed | change |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    parity = report["parity"]
    lines += ["", "## Verification", "",
              f"onnxruntime vs PyTorch on {parity['n_samples']} eval images: max abs diff "
              f"{parity['max_abs_diff']:.3g} (tolerance atol {parity['atol']:g} + rtol {parity.get('rtol', 0):g} x "
              f"max |output| {parity.get('scale', 0):.3g}), top-1 agreement "
              f"{100 * parity['top1_agreement']:.2f}%."]
    lines += reconstruction_lines(report.get("reconstruction"))
    bench = report.get("benchmark", {})
    if report.get("latency"):
        lines += ["", "## Latency (onnxruntime, interleaved in one run)", "",
                  f"Providers: {bench.get('providers')}; threads: {bench.get('threads')}; "
                  f"onnxruntime {bench.get('onnxruntime_version')}.", "",
                  "| batch | model | p50 ms | p90 ms | p99 ms |", "| ---: | --- | ---: | ---: | ---: |"]
        for batch, lat in report["latency"].items():
            for which in ("original", "compressed"):
                s = lat[which]
                lines.append(f"| {batch} | {which} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} |")
    lines += deployment_lines(report)
    lines += distributed_lines(report.get("distributed"))
    lines += _method_section(method)
    ranked = any(r.get("ranks") for r in report["layers"])
    lines += ["", "## Layers", "", "| layer | in before | in after | out before | out after |"
              + (" Tucker ranks (out, in) |" if ranked else ""), "| --- | ---: | ---: | ---: | ---: |"
              + (" ---: |" if ranked else "")]
    lines += [f"| {r['name']} | {r['in_before']} | {r['in_after']} | {r['out_before']} | {r['out_after']} |"
              + (f" {_fmt_ranks(r.get('ranks'))} |" if ranked else "") for r in report["layers"]]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {sec:.2f} |" for stage, sec in report["timings"].items()]
    lines += ["", "## Conventions", ""] + [f"- {v}" for v in report["conventions"].values()]
    lines += ["", "## Options", "", "```json", json.dumps(report["options"], indent=2, default=str), "```",
              "", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), ""]
    return "\n".join(lines)


def _fmt_ranks(ranks: Any) -> str:
    return "" if not ranks else f"{ranks[0]}, {ranks[1]}"


def _scalars(facts: Mapping[str, Any]) -> str:
    """``key value; ...`` for the scalar (and short list) entries of a method's facts."""
    shown = []
    for key, value in facts.items():
        if isinstance(value, float):
            shown.append(f"{key} {value:.4g}")
        elif isinstance(value, (str, int, bool)) or value is None:
            shown.append(f"{key} {value}")
        elif isinstance(value, list) and len(value) <= 8 and all(isinstance(v, (str, int, float)) for v in value):
            shown.append(f"{key} {', '.join(map(str, value))}")
    return "; ".join(shown)


def _method_section(method: Mapping[str, Any]) -> list[str]:
    """What the method chose: its settings, kept channels per pruning group, Tucker ranks per layer."""
    lines = ["", "## Method", "", f"Stages: {' then '.join(method.get('stages', []))}; "
             + _scalars({k: v for k, v in method.items() if k not in ("name", "stages", "options")}) + "."]
    for step in method.get("name", "").split("+"):
        if isinstance(method.get(step), Mapping):
            lines += ["", f"{step}: {_scalars(method[step])}."]
    if method.get("groups"):
        lines += ["", "| pruning group (root) | layers | channels | kept | aligned to |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {g['root']} | {len(g['layers'])} | {g['channels']} | {g['keep']} | {g.get('aligned_to') or '-'} |"
                  for g in method["groups"]]
    return lines + _latency_search_lines(method.get("latency_target"))


def _latency_search_lines(search: Mapping[str, Any] | None) -> list[str]:
    """``--target-latency``: every probe of the search, the chosen one marked."""
    if not search:
        return []
    lines = ["", f"### Latency budget: {search['goal']:g} x the original's p50 ({search.get('graph')} graph, batch "
             f"{search.get('batch')}, threads {search.get('threads')}); chose target {search['target']:g} "
             f"({search['ratio']:.3f} x) after {len(search['probes'])} probes in {search['seconds']:.1f} s", "",
             "| probe | target | achieved | MACs | p50 ms | original p50 ms | ratio | met |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {i} | {p['target']:g} | {p['achieved']:.4f} | {_fmt_int(p['macs'])} | {p['p50_ms']:.3f} | "
              f"{p['original_p50_ms']:.3f} | {p['ratio']:.3f} | {'yes' if p['met'] else 'no'} |"
              for i, p in enumerate(search["probes"], 1)]
    return lines


def print_table(report: Mapping[str, Any]) -> None:
    """The summary table on the terminal (stdout), via rich (shipped with typer)."""
    from rich.console import Console
    from rich.table import Table

    method = report["method"]
    table = Table(title=f"{method['name']} on {report['model']['arch']}: {method['achieved']:.1%} of "
                        f"{method['target_metric']} removed")
    for col, justify in (("metric", "left"), ("original", "right"), ("compressed", "right"), ("change", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in summary_rows(report):
        table.add_row(*row)
    parity = report["parity"]
    console = Console()
    console.print(table)
    search = method.get("latency_target")
    if search:
        console.print(f"latency budget {search['goal']:g}x: chose target {search['target']:g} of "
                      f"{method['target_metric']} at {search['ratio']:.3f}x the original ({search.get('graph')}, "
                      f"batch {search.get('batch')}) after {len(search['probes'])} timed probes")
    console.print(f"parity: max abs diff {parity['max_abs_diff']:.2e}, top-1 agreement "
                  f"{100 * parity['top1_agreement']:.1f}% on {parity['n_samples']} images")
