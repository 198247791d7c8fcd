"""The INT8 tables of docs/RESULTS.md and the check of issue 12's deployment targets, from stored rows.

A row that quantised (``Budget.quantize``) carries the columns of :func:`benchmarks._child.int8_columns`: the 2x2 of
fp32/INT8 x original/compressed, all four graphs timed interleaved in that row's own run. Rows of random-weight
models (``latency_only``) show latency and bytes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._render import kib, label, millions, pct, ratio, table, target_label

RANDOM = "n/a (random weights)"


def has_int8(rows: list[dict[str, Any]]) -> bool:
    return any("int8_format" in r for r in rows)


def int8_batches(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({int(k[len("int8_gain_b"):]) for r in rows for k in r if k.startswith("int8_gain_b")})


def _top1(row: dict[str, Any], fp32: str, int8: str) -> str:
    if row.get("latency_only"):
        return RANDOM
    return f"{pct(row.get(fp32))} → {pct(row.get(int8))}"


def _floats(row: dict[str, Any]) -> str:
    kept = [len(row.get("int8_float_nodes_orig") or []), len(row.get("int8_float_nodes") or [])]
    return f"{kept[0]} / {kept[1]}"


def int8_size_table(rows: list[dict[str, Any]]) -> list[str]:
    """Bytes and top-1 of the four graphs, the INT8 format and how many nodes each INT8 graph kept in float."""
    body = [[label(r), target_label(r), millions(r["macs"]), ratio(r["mac_reduction"], "×"),
             f"{kib(r['onnx_bytes_orig'])} → {kib(r['onnx_bytes'])}",
             f"{kib(r.get('int8_bytes_orig'))} → {kib(r.get('int8_bytes'))}",
             _top1(r, "top1_fp32_onnx_orig", "top1_int8_orig"), _top1(r, "top1_fp32_onnx", "top1_int8"),
             str(r.get("int8_format", "n/a")), _floats(r)] for r in rows if "int8_format" in r]
    return table(["method", "target", "MACs", "MAC reduction", "fp32 KiB original → compressed",
                  "INT8 KiB original → compressed", "top-1 % original fp32 → INT8",
                  "top-1 % compressed fp32 → INT8", "INT8 format", "nodes kept float original / compressed"],
                 ["---", "---"] + ["---:"] * 6 + ["---", "---:"], body)


def int8_speed_table(rows: list[dict[str, Any]]) -> list[str]:
    """p50 of the four graphs per batch size, their speed-ups over the fp32 original, and the INT8 gain."""
    sizes = int8_batches(rows)
    header, align = ["method", "target"], ["---", "---"]
    for b in sizes:
        header += [f"p50 ms b{b}: fp32 original, compressed; INT8 original, compressed",
                   f"b{b} fp32 compressed", f"b{b} INT8 original", f"b{b} INT8 compressed", f"b{b} INT8 gain"]
        align += ["---:"] * 5
    body = []
    for r in rows:
        if "int8_format" not in r:
            continue
        cells = [label(r), target_label(r)]
        for b in sizes:
            p50 = [r.get(k) for k in (f"p50_ms_orig_b{b}", f"p50_ms_b{b}", f"p50_ms_orig_int8_b{b}",
                                      f"p50_ms_int8_b{b}")]
            shown = "n/a" if None in p50 else f"{p50[0]:.3f}, {p50[1]:.3f}; {p50[2]:.3f}, {p50[3]:.3f}"
            cells += [shown] + [ratio(r.get(k), "×") for k in (f"speedup_b{b}", f"speedup_orig_int8_b{b}",
                                                                 f"speedup_int8_b{b}", f"int8_gain_b{b}")]
        body.append(cells)
    return table(header, align, body)


def int8_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Both INT8 tables with their legend (empty when no row quantised)."""
    if not has_int8(rows):
        return []
    legend = ("INT8 (fp32 and INT8 of the original and of the compressed model; all four graphs timed interleaved "
              "in the row's own run; speed-ups are over the fp32 original, **INT8 gain** is INT8 original p50 / "
              "INT8 compressed p50: what compression adds on top of quantising the original). INT8 top-1 is "
              "checked against the fp32 ONNX graph's top-1 on the same images.")
    return [legend, ""] + int8_size_table(rows) + [""] + int8_speed_table(rows)


# -- issue 12's targets --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One of issue 12's targets: ``column`` of the rows of ``model`` (at a filters target) against ``threshold``;
    ``most`` True: the column must not exceed it (an accuracy drop), else it must reach it (a speed-up)."""

    text: str
    short: str
    model: str
    column: str
    threshold: float
    most: bool = False

    def value(self, row: dict[str, Any]) -> float | None:
        if self.column == "int8_drop_worst":  # both INT8 graphs against their own fp32 graph
            drops = [row.get("int8_drop_orig"), row.get("int8_drop")]
            return None if None in drops else max(d for d in drops if d is not None)
        value = row.get(self.column)
        return None if value is None else float(value)

    def met(self, value: float) -> bool:
        return value <= self.threshold + 1e-12 if self.most else value >= self.threshold - 1e-12

    def shown(self, value: float) -> str:
        if self.most:
            return f"{100 * value:.1f} points"
        return f"{value:.2f}×"

    def margin(self, value: float) -> str:
        if self.most:
            return f"{100 * (self.threshold - value):+.1f} points"
        return f"{value / self.threshold:.0%} of the target"


TARGETS = (
    Target("ResNet-56, a third of the filters, INT8 compressed vs fp32 original, batch 1: ≥ 3×",
           "INT8 compressed / fp32 original b1 (≥ 3×)", "resnet56", "speedup_int8_b1", 3.0),
    Target("ResNet-56, a third of the filters, INT8 compressed vs INT8 original, batch 1: ≥ 1.5×",
           "INT8 gain b1 (≥ 1.5×)", "resnet56", "int8_gain_b1", 1.5),
    Target("ResNet-56, INT8 top-1 within 0.5 point of fp32 (worse of original and compressed)",
           "INT8 top-1 drop, worse graph (≤ 0.5 point)", "resnet56", "int8_drop_worst", 0.005, most=True),
    Target("ResNet-18 at 224, INT8 pruned vs INT8 original, batch 1: ≥ 2×", "INT8 gain b1 (≥ 2×)", "resnet18",
           "int8_gain_b1", 2.0),
)


def _candidates(rows: list[dict[str, Any]], target: Target) -> list[tuple[float, dict[str, Any]]]:
    found = [(target.value(r), r) for r in rows if r["status"] == "ok" and r["model"] == target.model
             and r.get("target_metric") == "filters" and abs(float(r.get("target") or 0) - 0.33) < 1e-9]
    return [(v, r) for v, r in found if v is not None]


def rows_against_targets(rows: list[dict[str, Any]], model: str = "resnet56") -> list[str]:
    """Every candidate row of ``model`` against all of its targets at once (the issue asks for one model that
    meets them together)."""
    targets = [t for t in TARGETS if t.model == model]
    body = []
    for _, r in _candidates(rows, targets[0]):
        values = [t.value(r) for t in targets]
        cells = ["n/a" if v is None else t.shown(v) + ("" if t.met(v) else " ✗") for t, v in zip(targets, values)]
        every = all(v is not None and t.met(v) for t, v in zip(targets, values))
        body.append([f"`{r['key']}`", ratio(r.get("mac_reduction"), "×"), *cells, "yes" if every else "no"])
    if not body:
        return []
    header = ["row", "MAC reduction", *[t.short for t in targets], "all met?"]
    return ["", f"Every {model} row against the targets together (✗: missed):", ""] + table(
        header, ["---"] + ["---:"] * (len(header) - 2) + ["---"], body)


def targets_section(rows: list[dict[str, Any]]) -> list[str]:
    """Each target: the best row, its value, met or missed and by how much; how many rows meet it; then every
    ResNet-56 row against all of its targets."""
    body = []
    for target in TARGETS:
        found = _candidates(rows, target)
        if not found:
            body.append([target.text, "no row yet", "n/a", "n/a", "n/a", "n/a", "0 of 0"])
            continue
        value, best = (min if target.most else max)(found, key=lambda vr: vr[0])
        meeting = sum(target.met(v) for v, _ in found)
        body.append([target.text, f"`{best['key']}`", ratio(best.get("mac_reduction"), "×"), target.shown(value),
                     "**met**" if target.met(value) else "missed", target.margin(value),
                     f"{meeting} of {len(found)}"])
    return ["### deploy: issue 12's targets", "",
            ("Each target's best row of this suite (ratios measured within one row's run). A third of the filters is "
             "the filters target of `l1`, `cmi`, `mipp`, `blocks` and `blocks+l1`; `tucker` removes params and is "
             "not a candidate. With 1,000 test images one point of top-1 is 10 images (sampling error about "
             "±0.9 point)."), ""] + table(
        ["target", "best row", "its MAC reduction", "measured", "met?", "margin", "rows meeting it"],
        ["---", "---", "---:", "---:", "---", "---:", "---:"], body) + rows_against_targets(rows)
