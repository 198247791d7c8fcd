"""Render the README's results section from ``report.json`` files (never typed by hand).

Usage::

    python -m benchmarks.readme_results runs/a/report.json runs/b/report.json   # record them, then render
    python -m benchmarks.readme_results                                         # re-render what is recorded

The selected facts of each report go to ``benchmarks/results/readme_runs.json`` (committed), and the table between
the ``<!-- results:start -->`` / ``<!-- results:end -->`` markers of README.md is rebuilt from that file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "readme_runs.json"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def summarise(report: dict) -> dict:
    """The facts one README row needs, from one report.json."""
    o, c, m = report["original"], report["compressed"], report["method"]
    lat = report.get("latency", {})
    return {
        "model": report["model"]["arch"], "method": m["name"], "target": m["target"],
        "metric": m["target_metric"], "achieved": round(m["achieved"], 4),
        "params": [o["params"], c["params"]], "macs": [o["macs"], c["macs"]], "filters": [o["filters"], c["filters"]],
        "onnx_bytes": [o["onnx_bytes"], c["onnx_bytes"]],
        "top1": [o["accuracy"], c.get("accuracy_before_finetune"), c["accuracy"]],
        "epochs": report["finetune"]["epochs"],
        "parity": [report["parity"]["max_abs_diff"], report["parity"]["top1_agreement"]],
        "latency": {b: [v["original"]["p50_ms"], v["compressed"]["p50_ms"], v["speedup"]] for b, v in lat.items()},
        "threads": report.get("benchmark", {}).get("threads"),
        "command": ("compress " + " ".join(report["tool"]["command"] or [])).replace(f"{ROOT.parent}/shared", "../shared"),
        "machine": report.get("machine", {}), "versions": {k: report["versions"].get(k) for k in
                                                           ("torch", "torch-pruning", "onnxruntime")},
    }


def _pct(a: float | None) -> str:
    return "n/a" if a is None else f"{100 * a:.1f}"


def render(rows: list[dict]) -> str:
    lines = ["| model | method | removed | params | MACs | ONNX KB | top-1 orig / pruned / fine-tuned | "
             "ORT p50 ms b1 (speedup) | ORT p50 ms b32 (speedup) | parity max diff |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: |"]
    for r in rows:
        lat = r["latency"]
        cell = {b: (f"{lat[b][0]:.2f} → {lat[b][1]:.2f} ({lat[b][2]:.2f}×)" if b in lat else "n/a") for b in ("1", "32")}
        t = r["top1"]
        lines.append(
            f"| {r['model']} | {r['method']} | {100 * r['achieved']:.1f}% of {r['metric']} | "
            f"{r['params'][0]:,} → {r['params'][1]:,} | {r['macs'][0] / 1e6:.1f}M → {r['macs'][1] / 1e6:.1f}M | "
            f"{r['onnx_bytes'][0] / 1024:.0f} → {r['onnx_bytes'][1] / 1024:.0f} | "
            f"{_pct(t[0])} / {_pct(t[1])} / {_pct(t[2])} ({r['epochs']} ep) | {cell['1']} | {cell['32']} | "
            f"{r['parity'][0]:.1e} |")
    lines.append("")
    lines.append("Commands (each row is one run; latency ratios compare two models timed interleaved in that run):")
    lines.append("")
    lines += [f"- `{r['command']}`" for r in rows]
    if rows:
        m, v = rows[-1]["machine"], rows[-1]["versions"]
        lines += ["", f"Machine: {m.get('processor')}, {m.get('cpu_count')} cores, {m.get('platform')}; "
                      f"torch {v['torch']}, torch-pruning {v['torch-pruning']}, onnxruntime {v['onnxruntime']}. "
                      "Top-1 is on `../shared/data/cifar10/test1000.npz` (1,000 images, ±0.9 points sampling error)."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = json.loads(RECORD.read_text()) if RECORD.exists() else []
    if argv:
        rows = [summarise(json.loads(Path(p).read_text())) for p in argv]
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(rows, indent=2) + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(rows)}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
