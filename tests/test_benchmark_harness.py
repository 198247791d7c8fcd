"""The benchmark harness (``python -m benchmarks.run``) end to end on the bundled sample: no ../shared, seconds.

A tiny suite (two methods that succeed, one unreachable target, one unregistered method) runs through the real CLI
entry point, one process per configuration, quantising both graphs to INT8; the test then checks every file it
writes (the INT8 columns included) and re-renders them from the stored JSON alone.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _int8_render, _render, torchvision_models
from benchmarks import run as bench_run
from benchmarks._suites import MODELS, Budget, Config, Suite

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = Suite(
    "tiny", "Two methods on the bundled sample",
    Budget(epochs=1, train_images=100, eval_images=100, batch_size=50, calib_samples=32, bench_batches=(1, 4),
           bench_repeats=2, quantize="int8"),
    grid=(Config("samplenet", "l1", 0.4), Config("samplenet", "random", 0.4),
          Config("samplenet", "random", 0.97),  # unreachable with min_keep 0.1: a failed row, the suite goes on
          Config("samplenet", "no-such-method", 0.4)),  # not registered: skipped with a note
    timeout_s=300)
README_TEXT = "# project\n\nintro\n\n## Results\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\n## After\n"


def _args(tmp: Path) -> list[str]:
    return ["--results-dir", str(tmp / "results"), "--docs", str(tmp / "docs" / "RESULTS.md"),
            "--readme", str(tmp / "README.md"), "--readme-suite", "tiny"] + ([] if HAS_MATPLOTLIB else ["--no-plots"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "README.md").write_text(README_TEXT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench_run.SUITES, "tiny", TINY)
        # --round-to 1 instead of the tool's default "auto", whose search exports, quantises and times a graph per
        # alignment (about 50 s per row on a busy core); it reaches the rows as a model override, keys unchanged
        mp.setitem(bench_run.MODELS, "samplenet", replace(MODELS["samplenet"], overrides=(("round_to", 1),)))
        mp.setenv("OMP_NUM_THREADS", "1")  # inherited by each configuration's process: a tiny net gains nothing
        # from a second thread, and loses a lot when the cores are shared with other work
        assert bench_run.main(["--suite", "tiny", *_args(tmp)]) == 0
    return tmp


def _stored(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "results" / "tiny" / "results.json").read_text())


def test_rows_record_every_measure_and_the_failure(tiny_run: Path) -> None:
    stored = _stored(tiny_run)
    meta, rows = stored["meta"], stored["rows"]
    assert meta["complete"] and meta["suite"] == "tiny" and meta["budget"]["train_images"] == 100
    assert meta["command"].startswith("python -m benchmarks.run --suite tiny")
    assert any("no-such-method: not registered" in n for n in meta["notes"])
    assert meta["versions"]["torch"] and meta["machine"]["cpu_count"]
    assert [(r["method"], r["target"], r["status"]) for r in rows] == [
        ("l1", 0.4, "ok"), ("random", 0.4, "ok"), ("random", 0.97, "failed")]
    failed = rows[2]
    assert "not reachable" in failed["error"] and "\n" not in failed["error"]
    for row in rows[:2]:
        assert row["key"] == f"samplenet-{row['method']}-filters-0.4" and row["target_metric"] == "filters"
        assert abs(row["achieved"] - 0.4) <= 0.02 and row["train_images"] == row["eval_images"] == 100
        assert row["params"] < row["params_orig"] and row["macs"] < row["macs_orig"]
        assert row["filters"] < row["filters_orig"] and row["onnx_bytes"] < row["onnx_bytes_orig"]
        for key in ("top1_orig", "top1_pruned", "top1_finetuned"):
            assert 0.0 <= row[key] <= 1.0
        assert row["top1_orig"] > 0.8  # the sample network is trained
        assert row["mac_reduction"] == pytest.approx(row["macs_orig"] / row["macs"], rel=1e-3)
        for batch in (1, 4):
            assert row[f"p50_ms_orig_b{batch}"] > 0 and row[f"p50_ms_b{batch}"] > 0
            assert row[f"efficiency_b{batch}"] == pytest.approx(row[f"speedup_b{batch}"] / row["mac_reduction"],
                                                                abs=1e-3)
        assert {"time_compress", "time_finetune", "time_export", "time_benchmark"} <= set(row)
        assert row["peak_rss_mib"] > 50 and row["wall_s"] > 0 and len(row["load_1m"]) == 2


def test_rows_carry_the_int8_columns(tiny_run: Path) -> None:
    """Every quantised row holds the 2x2 (fp32/INT8 x original/compressed): bytes, top-1, p50 per batch, speed-ups
    over the fp32 original, the INT8 gain, the format and the nodes kept float."""
    for row in _stored(tiny_run)["rows"][:2]:
        assert "U8" in row["int8_format"] or "S8" in row["int8_format"]
        assert 0 < row["int8_bytes"] < row["onnx_bytes"] and 0 < row["int8_bytes_orig"] < row["onnx_bytes_orig"]
        for suffix in ("", "_orig"):
            assert 0.0 <= row[f"top1_int8{suffix}"] <= 1.0 and 0.0 <= row[f"int8_agreement{suffix}"] <= 1.0
            assert row[f"int8_drop{suffix}"] == pytest.approx(row[f"top1_fp32_onnx{suffix}"]
                                                             - row[f"top1_int8{suffix}"], abs=1e-6)
            assert row[f"int8_drop{suffix}"] <= 0.01 + 1e-9  # the default --max-accuracy-drop, 1 point
            assert isinstance(row[f"int8_float_nodes{suffix}"], list)
        assert row["top1_fp32_onnx_orig"] == pytest.approx(row["top1_orig"], abs=0.011)  # ONNX vs PyTorch
        for b in (1, 4):
            fp32 = row[f"p50_ms_orig_b{b}"]
            assert row[f"speedup_int8_b{b}"] == pytest.approx(fp32 / row[f"p50_ms_int8_b{b}"], rel=0.01)
            assert row[f"speedup_orig_int8_b{b}"] == pytest.approx(fp32 / row[f"p50_ms_orig_int8_b{b}"], rel=0.01)
            assert row[f"int8_gain_b{b}"] == pytest.approx(row[f"p50_ms_orig_int8_b{b}"] / row[f"p50_ms_int8_b{b}"],
                                                           rel=0.01)
        assert row["time_quantize"] > 0


def test_csv_holds_the_same_rows(tiny_run: Path) -> None:
    rows = _stored(tiny_run)["rows"]
    with (tiny_run / "results" / "tiny" / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["key"] for r in table] == [r["key"] for r in rows]
    assert {"efficiency_b1", "efficiency_b4", "peak_rss_mib", "error"} <= set(table[0])
    for line, row in zip(table, rows):
        if row["status"] == "ok":
            assert math.isclose(float(line["efficiency_b4"]), row["efficiency_b4"])
            assert int(line["macs"]) == row["macs"]
    assert "not reachable" in table[2]["error"] and table[2]["efficiency_b1"] == ""


def test_results_page_and_readme_are_generated_from_the_rows(tiny_run: Path) -> None:
    rows = _stored(tiny_run)["rows"]
    page = (tiny_run / "docs" / "RESULTS.md").read_text()
    assert "## Suite `tiny`" in page and "python -m benchmarks.run --suite tiny" in page
    assert "efficiency b1" in page and "efficiency b4" in page and "peak MiB" in page
    assert "Machine: " in page and "torch 2." in page and "100 training images" in page
    assert "top-1 on 100 evaluation images" in page
    for row in rows[:2]:
        assert f"| `{row['method']}` | 0.4 of filters | {row['achieved']:.2f} |" in page
        assert f"{row['efficiency_b4']:.2f}" in page
    assert f"`random` at 0.97 of filters: {rows[2]['error']}" in page
    assert "INT8 gain" in page and "top-1 % compressed fp32 → INT8" in page
    assert f"{rows[0]['int8_gain_b4']:.2f}×" in page and f"| {rows[0]['int8_format']} |" in page
    assert "no-such-method: not registered" in page
    readme = (tiny_run / "README.md").read_text()
    head, block = readme.split("<!-- results:start -->")
    block, tail = block.split("<!-- results:end -->")
    assert head == README_TEXT.split("<!-- results:start -->")[0] and tail == "\n\n## After\n"
    assert "old" not in block and "[docs/RESULTS.md](docs/RESULTS.md)" in block and "**samplenet**" in block
    assert f"{rows[0]['efficiency_b4']:.2f}" in block and "1 configuration(s) failed" in block
    plots = sorted(p.name for p in (tiny_run / "results" / "tiny").glob("*.png"))
    if HAS_MATPLOTLIB:
        assert plots == ["latency_by_precision-samplenet.png", "latency_vs_macs-samplenet.png",
                         "top1_vs_macs-samplenet.png"]
        assert "](../results/tiny/latency_by_precision-samplenet.png)" in page
        assert "](../results/tiny/top1_vs_macs-samplenet.png)" in page


def test_render_only_rebuilds_the_same_files_from_json(tiny_run: Path) -> None:
    outputs = [tiny_run / "docs" / "RESULTS.md", tiny_run / "results" / "tiny" / "results.csv", tiny_run / "README.md"]
    before = [p.read_text() for p in outputs]
    outputs[0].unlink()
    outputs[1].unlink()
    assert bench_run.main(["--render-only", *_args(tiny_run)]) == 0
    assert [p.read_text() for p in outputs] == before


def test_missing_shared_files_skip_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_run.main(["--suite", "smoke", "--shared", str(tmp_path / "nowhere"), *_args(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0 and "skipped resnet20: checkpoint" in err and "--shared DIR" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "docs").exists()


def test_missing_matplotlib_is_one_actionable_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--suite", "smoke", "--results-dir", str(tmp_path)])
    assert str(exc.value) == bench_run.BENCH_EXTRA and 'pip install -e ".[bench]"' in str(exc.value)


def test_resume_keeps_only_successful_rows_of_the_same_budget(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    budget = TINY.budget.to_dict()
    rows = [{"key": "a", "status": "ok"}, {"key": "b", "status": "failed", "error": "x"}]
    path.write_text(json.dumps({"meta": {"budget": budget, "started": "t0", "duration_s": 5.0}, "rows": rows}))
    kept, earlier = bench_run._previous_rows(path, budget)
    assert set(kept) == {"a"} and earlier[0]["started"] == "t0" and earlier[0]["configurations_run"] == 1
    assert bench_run._previous_rows(path, {**budget, "epochs": 2}) == ({}, [])


def test_resume_runs_what_is_missing_and_records_every_invocation(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    suite = Suite("tiny", "t", TINY.budget, grid=(Config("samplenet", "l1", 0.4), Config("samplenet", "random", 0.4)))
    out = tmp_path / "tiny" / "results.json"
    out.parent.mkdir()
    first = {"key": "samplenet-l1-filters-0.4", "status": "ok", "top1_orig": 1.0, "top1_pruned": 0.5,
             "top1_finetuned": 0.9, "mac_reduction": 2.0, "wall_s": 1.0, "peak_rss_mib": 1.0}
    out.write_text(json.dumps({"meta": {"budget": suite.budget.to_dict(), "started": "2026-01-01T00:00:00",
                                        "duration_s": 100.0, "git": "abc", "command": "first"}, "rows": [first]}))
    ran: list[str] = []
    monkeypatch.setattr(bench_run, "run_config", lambda job, timeout: ran.append(job["key"]) or {**first,
                                                                                            "key": job["key"]})
    args = bench_run.parse_args(["--suite", "sample", "--resume", "--results-dir", str(tmp_path)])
    assert bench_run.run_suite(suite, suite.grid, args, "second") == out
    meta = json.loads(out.read_text())["meta"]
    assert ran == ["samplenet-random-filters-0.4"]
    assert [i["command"] for i in meta["invocations"]] == ["first", "second"]
    assert [i["configurations_run"] for i in meta["invocations"]] == [1, 1]
    assert meta["started"] == "2026-01-01T00:00:00" and meta["duration_s"] >= 100.0 and meta["complete"]
    assert "Assembled by --resume from `first`" in "\n".join(_render.invocations_lines(meta))


def test_readme_without_markers_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="results:start"):
        _render.write_readme_block("tiny", {"meta": {}, "rows": []}, readme, tmp_path / "RESULTS.md")
    assert readme.read_text() == "# no markers\n"


def test_a_partial_run_never_replaces_stored_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    stored = tmp_path / "results" / "tiny" / "results.json"
    stored.parent.mkdir(parents=True)
    stored.write_text('{"meta": {}, "rows": []}')
    monkeypatch.setitem(bench_run.SUITES, "tiny", TINY)
    assert bench_run.main(["--suite", "tiny", "--methods", "l1", *_args(tmp_path)]) == 2
    assert "pass --results-dir" in capsys.readouterr().err
    assert stored.read_text() == '{"meta": {}, "rows": []}'


def test_a_variant_row_runs_its_method_with_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tucker-adaptive`` rows compress with ``method="tucker"`` and ``tucker_adaptive``, under their own label."""
    from benchmarks import _child
    from benchmarks._suites import SUITES

    job = bench_run.make_job(Config("resnet20", "tucker-adaptive", 0.33), "params",
                             {"checkpoint": "m.th", "train": "t.npz", "eval": "e.npz"}, SUITES["cpu"], None)
    assert job["key"] == "resnet20-tucker-adaptive-params-0.33" and job["method"] == "tucker-adaptive"
    seen: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def fake_compress(model: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr("compressor.compress", fake_compress)
    monkeypatch.setattr(_child, "load_subset", lambda path, n, seed: [])
    with pytest.raises(_Stop):
        _child.run_job(job)
    assert seen["method"] == "tucker" and seen["method_options"] == {"tucker_adaptive": True}
    assert any(c.method == "tucker-adaptive" for c in SUITES["cpu"].grid)


def test_efficiency_section_from_round_to_study_and_rows(tmp_path: Path) -> None:
    study = {"threads": 1, "rows": [
        {"round_to": 1, "macs_ratio": 0.5, "speedup_b1": 1.2, "speedup_b32": 1.1},
        {"round_to": 8, "macs_ratio": 0.4, "speedup_b1": 1.5, "speedup_b32": 1.6}]}
    (tmp_path / "round_to_t1.json").write_text(json.dumps(study))
    rows = [{"status": "ok", "method": "l1", "efficiency_b1": e1, "efficiency_b32": e32}
            for e1, e32 in ((0.2, 0.5), (0.4, 0.7), (0.9, 0.6))] + [{"status": "failed", "method": "cmi"}]
    stored = {"cpu": {"meta": {"budget": {"bench_batches": [1, 32]}}, "rows": rows}}
    text = "\n".join(_render.efficiency_section(stored, tmp_path))
    assert "| 1 | 8 | 40.0% | 1.50× | 1.60× | 0.60 | 0.64 |" in text  # efficiency = speedup x MACs kept
    assert "largest speedup came at `--round-to 8`" in text and "between 0.55 and 0.64" in text
    assert "| `l1` | 3 | 0.40 | 0.60 |" in text and "`cmi`" not in text  # medians of the ok rows only
    assert _render.efficiency_section({}, tmp_path / "absent") == []


def test_stored_budgets_from_before_int8_still_resume(tmp_path: Path) -> None:
    """Rows stored before ``Budget.quantize`` existed ran without INT8: they match ``quantize="none"`` only."""
    path = tmp_path / "results.json"
    budget = Budget(epochs=1, train_images=100).to_dict()
    old = {k: v for k, v in budget.items() if k not in bench_run.LEGACY_BUDGET}  # nor the cpu-hour fields
    path.write_text(json.dumps({"meta": {"budget": old, "started": "t0"}, "rows": [{"key": "a", "status": "ok"}]}))
    assert set(bench_run._previous_rows(path, budget)[0]) == {"a"}
    assert bench_run._previous_rows(path, {**budget, "quantize": "int8"}) == ({}, [])


def test_round_to_and_latency_only_jobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A row's ``round_to`` reaches compress and its key; a random-weight model compresses a saved seeded
    initialisation of its ``--arch`` on seeded noise, with the model's overrides and without evaluation data."""
    from benchmarks import _child
    from benchmarks._suites import LATENCY_ONLY, NOISE224, ModelSpec

    spec = ModelSpec("tinyrand", None, "samplenet", NOISE224, latency_only=True, overrides=LATENCY_ONLY)
    monkeypatch.setitem(bench_run.MODELS, "tinyrand", spec)
    suite = Suite("t", "t", Budget(epochs=1, train_images=None, threads=1, quantize="int8"),
                  grid=(Config("tinyrand", "l1", 0.33, None, 16),))
    job = bench_run.make_job(suite.grid[0], "filters", {"checkpoint": "", "train": "", "eval": ""}, suite, None)
    assert job["key"] == "tinyrand-l1-filters-0.33-r16" and job["latency_only"]
    seen: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def fake_compress(model: Any, **kwargs: Any) -> None:
        import torch

        seen.update(kwargs, state=torch.load(model, weights_only=True))
        raise _Stop

    monkeypatch.setattr("compressor.compress", fake_compress)
    monkeypatch.setitem(job, "synthetic", {"image_size": 32})  # samplenet takes 32x32 images
    with pytest.raises(_Stop):
        _child.run_job(job)
    assert seen["round_to"] == 16 and seen["quantize"] == "int8" and seen["eval_data"] is None
    assert seen["epochs"] == 0 and seen["bench_batches"] == (1,) and seen["max_accuracy_drop"] == 99.0
    assert len(seen["data"]) == 64 and seen["data"].image_shape == (3, 32, 32) and seen["threads"] == 1
    assert any(key.endswith("weight") for key in seen["state"])


def test_unsupported_round_to_and_missing_torchvision_are_skipped_with_a_note(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reasons = bench_run.unsupported_round_to((Config("resnet56", "l1", 0.33, None, 0),
                                              Config("resnet56", "l1", 0.33, None, 16)))
    assert list(reasons) == [0] and "--round-to 0: not accepted" in reasons[0]
    monkeypatch.setattr(torchvision_models, "available", lambda: False)
    files, reason = bench_run.model_files("resnet18", bench_run.parse_args(["--suite", "deploy"]))
    assert files == {} and reason == f"resnet18: torchvision is not installed ({torchvision_models.INSTALL})"
    assert "pip install --no-deps torchvision==0.28.0" in reason
    assert MODELS["resnet18"].latency_only and MODELS["resnet18"].checkpoint is None


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_factories_build_through_arch(name: str) -> None:
    """``--arch benchmarks/torchvision_models.py:<name>`` builds torchvision's model, beside a CPU-only torch."""
    if not torchvision_models.available():
        pytest.skip(f"torchvision is not installed: the deploy suite's 224x224 models need it "
                    f"({torchvision_models.INSTALL})")
    import torch

    from compressor.io import resolve_arch

    factory, shape = resolve_arch(f"{torchvision_models.__file__}:{name}")
    assert shape is None  # read from the data, 224x224 in the deploy suite
    model = getattr(torchvision_models, name)(num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert sum(p.numel() for p in factory().parameters()) > 3_000_000  # 1000 classes by default


def _target_row(key: str, model: str, **values: float) -> dict[str, Any]:
    return {"key": key, "model": model, "status": "ok", "target_metric": "filters", "target": 0.33, **values}


def test_targets_section_names_the_best_row_and_the_margin() -> None:
    rows = [_target_row("r56-a", "resnet56", speedup_int8_b1=2.5, int8_gain_b1=1.2, int8_drop=0.003,
                        int8_drop_orig=-0.001),
            _target_row("r56-b", "resnet56", speedup_int8_b1=3.3, int8_gain_b1=1.1, int8_drop=0.008,
                        int8_drop_orig=0.0),
            _target_row("r18-a", "resnet18", int8_gain_b1=1.8, mac_reduction=2.2),
            {**_target_row("r56-half", "resnet56", speedup_int8_b1=9.0, int8_gain_b1=9.0), "target": 0.5}]
    text = "\n".join(_int8_render.targets_section(rows))
    assert "r56-half" not in text  # the targets are at a third of the filters; other targets are not candidates
    assert "| `r56-b` | n/a | 3.30× | **met** | 110% of the target | 1 of 2 |" in text
    assert "| `r56-a` | n/a | 1.20× | missed | 80% of the target | 0 of 2 |" in text
    assert "| `r56-a` | n/a | 0.3 points | **met** | +0.2 points | 1 of 2 |" in text
    assert "| `r18-a` | 2.20× | 1.80× | missed | 90% of the target | 0 of 1 |" in text
    assert "| `r56-b` | n/a | 3.30× | 1.10× ✗ | 0.8 points ✗ | no |" in text  # the targets together
    assert "no row yet" in "\n".join(_int8_render.targets_section([]))


# ------------------------------------------------------------------------------------ the cpu-hour suites (issue 13)
def _screen(rows: list[tuple[str, str, float | None]], complete: bool = True) -> dict[str, Any]:
    return {"meta": {"complete": complete}, "rows": [
        {"key": f"resnet20-{m}-macs-0.5-r8", "method": m, "status": status, "top1_finetuned": top1}
        for m, status, top1 in rows]}


def test_cpu_hour_screen_runs_every_method_at_half_the_macs_for_five_minutes_on_one_thread() -> None:
    from benchmarks._suites import CPU_HOUR_METHODS, OURS, SUITES, TP_PEERS

    screen, hour = SUITES["cpu-hour-screen"], SUITES["cpu-hour"]
    assert {"cmi", "mipp", "blocks", "blocks+l1", "l1", "random"} <= set(CPU_HOUR_METHODS)
    assert set(TP_PEERS) <= set(CPU_HOUR_METHODS) and len(TP_PEERS) == 6 and not set(OURS) & set(TP_PEERS)
    assert [c.method for c in screen.grid] == list(CPU_HOUR_METHODS)
    assert {(c.model, c.target, c.metric, c.round_to) for c in screen.grid} == {("resnet20", 0.5, "macs", 8)}
    for suite, minutes, every in ((screen, 5.0, 1.0), (hour, 60.0, 5.0)):
        b = suite.budget
        assert (b.budget_minutes, b.eval_every_minutes, b.epochs, b.train_images) == (minutes, every, 0, None)
        assert b.threads == 1 and b.quantize == "int8" and b.eval_images is None and b.seed == 0
    assert hour.selected_by == "cpu-hour-screen" and hour.grid == ()
    assert hour.timeout_s > 3600 and screen.timeout_s > 5 * 60


def test_the_hour_takes_the_best_two_of_ours_and_of_the_tp_criteria_from_the_screen() -> None:
    from benchmarks._suites import SelectionError, select_grid

    screen = _screen([("cmi", "ok", 0.80), ("mipp", "ok", 0.84), ("blocks", "failed", None), ("blocks+l1", "ok", 0.83),
                      ("l1", "ok", 0.99), ("random", "ok", 0.98),  # baselines are never chosen
                      ("tp-magnitude", "ok", 0.85), ("tp-taylor", "ok", 0.86), ("tp-lamp", "ok", 0.85),
                      ("tp-bn", "failed", None)])
    grid, note = select_grid(screen)
    assert [(c.model, c.method, c.target, c.metric, c.round_to) for c in grid] == [
        ("resnet56", m, 0.5, "macs", 8) for m in ("mipp", "blocks+l1", "tp-taylor", "tp-magnitude")]  # ties: first
    assert "best two of ours mipp 84.0%, blocks+l1 83.0%; best two tp-* tp-taylor 86.0%, tp-magnitude 85.0%" in note
    with pytest.raises(SelectionError, match="results are not stored; run python -m benchmarks.run --suite "
                                             "cpu-hour-screen --resume first"):
        select_grid(None)
    with pytest.raises(SelectionError, match="has not finished"):
        select_grid({**screen, "meta": {"complete": False}})
    with pytest.raises(SelectionError, match="1 successful row"):
        select_grid(_screen([("cmi", "ok", 0.8), ("mipp", "failed", None), ("tp-bn", "ok", 0.8),
                             ("tp-fpgm", "ok", 0.7)]))


def test_the_hour_lists_its_rows_from_the_stored_screen_and_refuses_without_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--suite", "cpu-hour", "--results-dir", str(tmp_path / "results"), "--docs", str(tmp_path / "R.md"),
            "--no-readme", "--no-plots"]
    assert bench_run.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("--suite cpu-hour: the cpu-hour-screen results are not stored; run python -m "
                           "benchmarks.run --suite cpu-hour-screen --resume first")
    assert not (tmp_path / "results").exists() and not (tmp_path / "R.md").exists()
    stored = tmp_path / "results" / "cpu-hour-screen" / "results.json"
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps(_screen([("cmi", "ok", 0.8), ("mipp", "ok", 0.7), ("tp-bn", "ok", 0.6),
                                          ("tp-fpgm", "ok", 0.9)])))
    assert bench_run.main([*args, "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "best two of ours cmi 80.0%, mipp 70.0%" in lines[0]
    assert lines[1:] == [f"resnet56 {m} 0.5 macs round-to 8" for m in ("cmi", "mipp", "tp-fpgm", "tp-bn")]


def test_a_cpu_hour_job_fine_tunes_for_its_minutes_with_the_curve_and_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen's budget reaches compress as --budget-minutes 5 --eval-every-minutes 1 --distill (no --epochs),
    and CompressConfig accepts the whole set of options."""
    from benchmarks import _child
    from benchmarks._suites import SUITES
    from compressor.api import _config

    suite = SUITES["cpu-hour-screen"]
    job = bench_run.make_job(suite.grid[0], "macs", {"checkpoint": "m.th", "train": "t.npz", "eval": "e.npz"}, suite,
                             None)
    assert job["key"] == "resnet20-cmi-macs-0.5-r8"
    seen: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def fake_compress(model: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr("compressor.compress", fake_compress)
    monkeypatch.setattr(_child, "load_subset", lambda path, n, seed: [] if n is None else pytest.fail("a subset"))
    with pytest.raises(_Stop):
        _child.run_job(job)
    assert (seen["budget_minutes"], seen["eval_every_minutes"], seen["distill"], seen["epochs"]) == (5.0, 1.0, True, 0)
    assert seen["round_to"] == 8 and seen["threads"] == 1 and seen["quantize"] == "int8"
    assert seen["target"] == 0.5 and seen["target_metric"] == "macs" and seen["method"] == "cmi"
    cfg = _config(None, {k: v for k, v in seen.items() if k not in ("arch", "normalize", "data", "eval_data")})
    assert cfg.trains and cfg.budget_minutes == 5.0 and cfg.eval_every_minutes == 1.0
    other = _child.compress_options(bench_run.make_job(Config("resnet20", "l1", 0.5), "filters", {}, SUITES["cpu"],
                                                       None))
    assert other["epochs"] == 1 and not {"budget_minutes", "eval_every_minutes"} & set(other)
    assert other["distill"] is False  # passed explicitly: the suite keeps its meaning whatever the tool's default


def test_a_row_carries_the_curve_of_its_report() -> None:
    from benchmarks._child import summarise

    side = {"params": 10, "macs": 100, "filters": 8, "onnx_bytes": 1000, "accuracy": 0.9}
    report = {"original": side, "compressed": {**side, "macs": 50, "accuracy": 0.8},
              "method": {"target_metric": "macs", "achieved": 0.5}, "latency": {}, "parity": {"max_abs_diff": 0.0},
              "timings": {"finetune": 300.0}, "finetune": {"epochs": 2, "seconds": 301.0, "curve": [
                  {"minutes": 1.0, "epoch": 1, "step": 10, "top1": 0.7},
                  {"minutes": 5.0, "epoch": 2, "step": 50, "top1": 0.8, "final": True}]}}
    row = summarise(report, [])
    assert row["curve"] == report["finetune"]["curve"] and row["finetune_epochs"] == 2 and row["finetune_s"] == 301.0
    del report["finetune"]["curve"]
    assert "curve" not in summarise(report, [])  # rows of the other suites keep their columns


def _hour_row(model: str, method: str, top1: float, **extra: Any) -> dict[str, Any]:
    return {"key": f"{model}-{method}-macs-0.5-r8", "model": model, "method": method, "status": "ok",
            "target": 0.5, "target_metric": "macs", "round_to": 8, "macs": 20_000_000, "macs_orig": 41_000_000,
            "mac_reduction": 2.05, "params": 130_000, "params_orig": 270_000, "top1_orig": 0.915,
            "top1_int8_orig": 0.913, "top1_pruned": 0.5, "top1_finetuned": top1, "top1_int8": top1 - 0.002,
            "p50_ms_b1": 1.5, "p50_ms_int8_b1": 0.9, "speedup_int8_b1": 2.1,
            "curve": [{"minutes": 1.0, "epoch": 1, "step": 100, "top1": top1 - 0.05},
                      {"minutes": 5.0, "epoch": 2, "step": 500, "top1": top1, "final": True}], **extra}


def test_cpu_hour_sections_state_the_targets_the_missing_rows_and_plot_the_curves(tmp_path: Path) -> None:
    from benchmarks import _hour_render

    rows = [_hour_row("resnet20", "cmi", 0.86), _hour_row("resnet20", "tp-taylor", 0.85),
            _hour_row("resnet20", "l1", 0.90), {"key": "k", "model": "resnet20", "method": "mipp", "status": "failed",
                                               "target": 0.5, "target_metric": "macs", "error": "boom"}]
    stored = {"cpu-hour-screen": {"meta": {"complete": False, "budget": {"eval_every_minutes": 1.0}}, "rows": rows}}
    text = "\n".join(_hour_render.section("cpu-hour-screen", stored))
    assert "| `cmi` | ours | 20.0 M (2.05×) | 130,000 | 50.0 | **86.0** | 85.8 | 1.50 / 0.90 | 2.10× |" in text
    assert text.index("`l1` | baseline") < text.index("`cmi` | ours") < text.index("`tp-taylor` | tp-*")
    assert "5.0 min, 2 ep., 500 steps" in text and "1 step" not in text
    assert "| method | 0 min | 1 min | end of fine-tuning |" in text
    assert "| `cmi` | 50.0 | 81.0 | 86.0 (5.0 min) |" in text  # before fine-tuning, after 1 minute, at the end
    assert "Missing rows (not run yet, or failed): `mipp`, `blocks+l1`, `blocks`, `random`, `tp-magnitude`" in text
    assert "| `cmi` 86.0% vs `tp-taylor` 85.0% | **met** (+1.0 points) |" in text
    assert "| cpu-hour | no row yet |" in text  # the hour's targets before it ran
    hour = {"meta": {"complete": True}, "rows": [
        _hour_row("resnet56", "mipp", 0.915, top1_orig=0.926), _hour_row("resnet56", "tp-lamp", 0.92)]}
    text = "\n".join(_hour_render.section("cpu-hour", {**stored, "cpu-hour": hour}))
    assert "Rows: chosen once the cpu-hour-screen suite has finished." in text
    assert "`mipp` 91.5% vs `tp-lamp` 92.0% | missed (-0.5 points)" in text
    assert "`tp-lamp` 92.0% at 2.05× fewer MACs; original 91.5% | **met** (+0.5 points against the original)" in text
    hour["rows"][1]["top1_finetuned"] = 0.90
    text = "\n".join(_hour_render.section("cpu-hour", {**stored, "cpu-hour": hour}))
    assert "`mipp` 91.5% at 2.05× fewer MACs; original 92.6% | missed (-1.1 points against the original)" in text
    hour["rows"][0]["mac_reduction"] = 1.96
    text = "\n".join(_hour_render.section("cpu-hour", {**stored, "cpu-hour": hour}))
    assert "| missed (-1.1 points against the original; only 1.96× fewer MACs, short of 2×) |" in text
    if HAS_MATPLOTLIB:
        from benchmarks import _plots

        path = _plots.plot_minutes(rows[:3], "resnet20", "cpu-hour-screen", tmp_path / "minutes.png")
        assert path.stat().st_size > 1000


def test_a_rebuilt_results_page_keeps_the_sections_other_scripts_wrote(tmp_path: Path) -> None:
    """benchmarks/imp_lmc.py and benchmarks/slt.py write their own marked sections into docs/RESULTS.md; the
    harness's --render-only rebuilds the page from the suites and must keep them, once each, in page order."""
    docs = tmp_path / "RESULTS.md"
    imp = "<!-- imp_lmc:start -->\n## IMP\n\n| a |\n<!-- imp_lmc:end -->"
    slt = "<!-- slt:begin -->\n## SLT\n<!-- slt:end -->"
    docs.write_text(f"# old page\n\nstale suite text\n\n{slt}\n\nmore stale text\n{imp}\n")
    for _ in range(2):  # idempotent: a second render neither drops nor duplicates them
        _render.write_results_page({}, docs, tmp_path)
        page = docs.read_text()
        assert page.startswith("# Benchmark results") and "stale" not in page
        assert page.count(imp) == 1 and page.count(slt) == 1 and page.index(slt) < page.index(imp)
    assert _render.kept_sections("<!-- x:start -->\nunterminated\n") == []
