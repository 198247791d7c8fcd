"""The ``cpu-hour`` sections of docs/RESULTS.md (issue 13, item 6), from stored rows: one table per suite (fp32 and
INT8 top-1, MACs, params, latency, the fine-tuning done), the rows still missing, and issue 13's targets with
met/missed and the margin.

The screen's grid is fixed (:data:`benchmarks._suites.SUITES`); the hour's comes from the stored screen
(:func:`benchmarks._suites.select_grid`), so its missing rows are known once the screen has finished.
"""

from __future__ import annotations

from typing import Any

from ._render import millions, pct, ratio, table, thousands
from ._suites import OURS, SUITES, TP_PEERS, SelectionError, select_grid

SCREEN, HOUR = "cpu-hour-screen", "cpu-hour"
SAMPLING = "1,000 test images: a top-1 difference under about 1 point is within sampling error"


def group(method: str) -> str:
    return "ours" if method in OURS else "tp-*" if method in TP_PEERS else "baseline"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _curve_end(row: dict[str, Any]) -> str:
    curve = row.get("curve") or []
    if not curve:
        return "n/a"
    last = curve[-1]
    steps = f"{last['step']:,} step" + ("" if last["step"] == 1 else "s")
    return f"{last['minutes']:.1f} min, {last['epoch']} ep., {steps}"


def expected_methods(name: str, stored: dict[str, dict[str, Any]]) -> list[str] | None:
    """The methods suite ``name`` runs (None: not known yet, the hour before its screen has finished)."""
    if name == SCREEN:
        return [c.method for c in SUITES[SCREEN].grid]
    try:
        return [c.method for c in select_grid(stored.get(SCREEN))[0]]
    except SelectionError:
        return None


def hour_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per successful row, best fp32 top-1 first."""
    ordered = sorted(rows, key=lambda r: -(r.get("top1_finetuned") or 0.0))
    body = [[f"`{r['method']}`", group(r["method"]), f"{millions(r['macs'])} ({ratio(r['mac_reduction'], '×')})",
             thousands(r["params"]), pct(r.get("top1_pruned")), f"**{pct(r.get('top1_finetuned'))}**",
             pct(r.get("top1_int8")), f"{_ms(r.get('p50_ms_b1'))} / {_ms(r.get('p50_ms_int8_b1'))}",
             ratio(r.get("speedup_int8_b1"), "×"), _curve_end(r)] for r in ordered]
    return table(["method", "group", "MACs (reduction)", "params", "top-1 % before fine-tuning",
                  "top-1 % fp32", "top-1 % INT8", "p50 ms b1 fp32 / INT8", "INT8 speedup b1 over fp32 original",
                  "fine-tuning done"], ["---", "---"] + ["---:"] * 8, body)


def curve_table(rows: list[dict[str, Any]], every: float | None) -> list[str]:
    """Top-1 along the fine-tuning: one column per evaluation time (the curve's minutes rounded to ``every``), 0 for
    the top-1 before fine-tuning, and the end of training; rows in the order of :func:`hour_table`."""
    ordered = sorted((r for r in rows if r.get("curve")), key=lambda r: -(r.get("top1_finetuned") or 0.0))
    if not ordered:
        return []
    step = every or 1.0

    def at(row: dict[str, Any]) -> dict[float, float]:
        return {round(round(p["minutes"] / step) * step, 6): p["top1"] for p in row["curve"] if not p.get("final")}

    times = sorted({t for r in ordered for t in at(r)})
    body = []
    for r in ordered:
        points, end = at(r), r["curve"][-1]
        body.append([f"`{r['method']}`", pct(r.get("top1_pruned"))] + [pct(points.get(t)) for t in times]
                    + [f"{pct(end['top1'])} ({end['minutes']:.1f} min)" if end.get("final") else "n/a"])
    return table(["method", "0 min"] + [f"{t:g} min" for t in times] + ["end of fine-tuning"],
                 ["---"] + ["---:"] * (len(times) + 2), body)


def _best(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, Any] | None:
    found = [r for r in rows if r["method"] in methods and r.get("top1_finetuned") is not None]
    return max(found, key=lambda r: r["top1_finetuned"]) if found else None


def _beats(rows: list[dict[str, Any]], where: str) -> list[str]:
    ours, peer = _best(rows, OURS), _best(rows, TP_PEERS)
    if ours is None or peer is None:
        return ["best of ours beats the best tp-* criterion", where, "no row yet", ""]
    gap = 100 * (ours["top1_finetuned"] - peer["top1_finetuned"])
    verdict = "**met**" if gap > 0 else "missed"
    return ["best of ours beats the best tp-* criterion", where,
            f"`{ours['method']}` {pct(ours['top1_finetuned'])}% vs `{peer['method']}` {pct(peer['top1_finetuned'])}%",
            f"{verdict} ({gap:+.1f} points)"]


def _within_a_point(rows: list[dict[str, Any]]) -> list[str]:
    what = "ResNet-56, ≥ 2× fewer MACs, 60 min: top-1 within 1 point of the original"
    half = [r for r in rows if r.get("top1_finetuned") is not None]
    if not half:
        return [what, HOUR, "no row yet", ""]
    best = max(half, key=lambda r: r["top1_finetuned"])
    gap = 100 * (best["top1_finetuned"] - best["top1_orig"])
    ok = gap >= -1.0 and best["mac_reduction"] >= 1.995
    return [what, HOUR, (f"`{best['method']}` {pct(best['top1_finetuned'])}% at {best['mac_reduction']:.2f}× "
                         f"fewer MACs; original {pct(best['top1_orig'])}%"),
            f"{'**met**' if ok else 'missed'} ({gap:+.1f} points against the original"
            + ("" if best["mac_reduction"] >= 1.995 else
               f"; only {best['mac_reduction']:.2f}× fewer MACs, short of 2×") + ")"]


def targets_section(stored: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 13's targets that the cpu-hour suites measure, met or missed, with the numbers."""
    screen = [r for r in stored.get(SCREEN, {}).get("rows", []) if r["status"] == "ok"]
    hour = [r for r in stored.get(HOUR, {}).get("rows", []) if r["status"] == "ok"]
    body = [_beats(screen, SCREEN), _beats(hour, HOUR), _within_a_point(hour)]
    return ["### Issue 13's targets (cpu-hour)", "",
            *table(["target", "suite", "measured (fp32 top-1 on test1000)", "verdict"], ["---", "---", "---", "---"],
                   body),
            "", (f"Top-1 on {SAMPLING}. The issue states 60 CPU-minutes on 2 cores; these rows fine-tune on one "
                 "core (`--threads 1`, the run pinned with taskset), half that compute. The reconstruction target "
                 "(l1 at a third of the filters, before fine-tuning) is measured by `benchmarks/reconstruct.py`, not "
                 "here.")]


def section(name: str, stored: dict[str, dict[str, Any]]) -> list[str]:
    """The cpu-hour table of suite ``name`` (successful rows), the rows missing, and, under the hour (or the screen
    when the hour has no results yet), the targets."""
    rows = stored[name]["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [f"### {name}: top-1 after fine-tuning by the clock", ""]
    if ok:
        r0 = ok[0]
        lines += [(f"{r0['model']}, original {millions(r0['macs_orig'])} MACs, {thousands(r0['params_orig'])} params, "
                   f"top-1 {pct(r0['top1_orig'])}% fp32, {pct(r0.get('top1_int8_orig'))}% INT8; every row at half "
                   "the MACs (`--target 0.5 --target-metric macs --round-to 8`; the achieved reduction beside the "
                   "MACs). The plot of top-1 against fine-tuning minutes per method is "
                   f"`top1_vs_minutes-{r0['model']}.png` below."), ""]
        lines += hour_table(ok)
        every = stored[name].get("meta", {}).get("budget", {}).get("eval_every_minutes")
        curves = curve_table(ok, every)
        if curves:
            lines += ["", "Top-1 % along the fine-tuning (0 min: after compression, reconstruction where the method "
                      "has it, and BatchNorm recalibration; then every "
                      + (f"{every:g} min" if every else "evaluation") + " of training; the end is the last epoch's "
                      "evaluation):", "", *curves]
    expected = expected_methods(name, stored)
    done = {r["method"] for r in ok}
    if expected is None:
        lines += ["", "Rows: chosen once the cpu-hour-screen suite has finished."]
    else:
        missing = [m for m in expected if m not in done]
        lines += ["", "Missing rows (not run yet, or failed): " + ", ".join(f"`{m}`" for m in missing) + "."
                  if missing else "Every row of the suite is stored."]
    if name == HOUR or (name == SCREEN and HOUR not in stored):
        lines += [""] + targets_section(stored)
    return lines
