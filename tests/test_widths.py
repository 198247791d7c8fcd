"""``--round-to auto``: channel widths chosen by measured latency (compressor.widths), through the method, the
pipeline, the API and the CLI. Timers are fakes, so every choice is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compressor import cli, compress, pipeline, widths
from compressor.config import CompressConfig
from compressor.errors import PruningError
from compressor.methods.base import Budget, MethodContext
from compressor.methods.baselines import L1
from compressor.methods.prune import Scores, ScoringContext
from compressor.pruning import engine

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NORMALIZE = "0.5,0.5,0.5/0.5,0.5,0.5"
FAKE_P50 = {1: 5.0, 2: 4.0, 4: 1.0, 8: 2.0, 16: 3.0, 32: 6.0}  # 4 is the fastest, and no simple rule gives it


def _built(k: int, *, key=None) -> widths.Built:
    return widths.Built(nn.Linear(1, 1), achieved=0.33 + k / 1000, macs=1000 - k, key=key, result=f"model at {k}")


def _fake_measure(calls: list[list[int]]):
    def measure(models):
        calls.append(sorted(models))
        return {k: FAKE_P50[k] for k in models}

    return measure


# ------------------------------------------------------------------------------------------- choose_alignment


def test_choose_alignment_picks_the_fastest_and_times_every_candidate_in_one_call() -> None:
    calls: list[list[int]] = []
    choice = widths.choose_alignment(widths.DEFAULT_CANDIDATES, _built, _fake_measure(calls))
    assert choice.chosen == 4 and choice.built.result == "model at 4"
    assert calls == [[1, 2, 4, 8, 16, 32]]  # one interleaved measurement, not one per candidate
    rows = choice.section(graph="fp32", batch=1, threads=1)
    assert rows["chosen"] == 4 and (rows["graph"], rows["batch"], rows["threads"]) == ("fp32", 1, 1)
    assert [c["round_to"] for c in rows["candidates"]] == [1, 2, 4, 8, 16, 32]
    assert [c["p50_ms"] for c in rows["candidates"]] == [FAKE_P50[k] for k in (1, 2, 4, 8, 16, 32)]
    assert all(c["met"] and c["macs"] == 1000 - c["round_to"] and c["achieved"] for c in rows["candidates"])
    assert set(rows["seconds"]) == {"build", "measure"}


def test_candidates_that_miss_the_target_are_skipped_but_recorded() -> None:
    calls: list[list[int]] = []
    choice = widths.choose_alignment((1, 4, 8), lambda k: None if k == 4 else _built(k), _fake_measure(calls))
    assert choice.chosen == 8 and calls == [[1, 8]]
    missed = next(c for c in choice.candidates if c.round_to == 4)
    assert not missed.met and missed.p50_ms is None and missed.macs is None
    with pytest.raises(PruningError, match="cannot be met at any alignment"):
        widths.choose_alignment((1, 2), lambda k: None, _fake_measure([]))


def test_identical_graphs_are_timed_once_and_the_earlier_candidate_wins_a_tie() -> None:
    calls: list[list[int]] = []
    choice = widths.choose_alignment((8, 16, 32), lambda k: _built(k, key="same" if k > 8 else None),
                                     _fake_measure(calls))
    assert calls == [[8, 16]]  # 32 has the same graph as 16
    assert {c.round_to: c.p50_ms for c in choice.candidates} == {8: 2.0, 16: 3.0, 32: 3.0}
    tie = widths.choose_alignment((16, 32), lambda k: _built(k, key="same"), _fake_measure([]))
    assert tie.chosen == 16


def test_candidates_are_capped_at_the_widths_of_the_model() -> None:
    assert widths.candidate_alignments([16, 32, 64]) == (1, 2, 4, 8, 16, 32)
    assert widths.candidate_alignments([16, 32]) == (1, 2, 4, 8, 16)
    assert widths.candidate_alignments([3]) == (1, 2)
    assert widths.candidate_alignments([]) == (1,)


def test_onnx_latency_exports_quantises_and_times_all_candidates_together(monkeypatch) -> None:
    seen = []

    def fake_time(paths, **kw):
        seen.append(({name: (p.name, p.exists()) for name, p in paths.items()}, kw))
        return {name: 1.0 for name in paths}

    monkeypatch.setattr(widths, "time_graphs", fake_time)
    torch.manual_seed(0)
    models = {k: nn.Sequential(nn.Conv2d(3, c, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 2))
              for k, c in ((1, 5), (4, 8))}
    calib = [torch.randn(4, 3, 8, 8).numpy() for _ in range(2)]
    measure = widths.OnnxLatency(torch.zeros(1, 3, 8, 8), batch=2, threads=1, calib=calib, repeats=3)
    assert measure(models) == {1: 1.0, 4: 1.0} and measure.describe()["graph"] == "int8"
    (paths, kw), = seen
    assert paths == {"round_to=1": ("round_to_1.int8.onnx", True), "round_to=4": ("round_to_4.int8.onnx", True)}
    assert kw == {"input_shape": (3, 8, 8), "batch": 2, "threads": 1, "repeats": 3, "seed": 0}
    widths.OnnxLatency(torch.zeros(1, 3, 8, 8))(models)
    assert seen[1][0]["round_to=1"][0] == "round_to_1.onnx"  # fp32 without calibration data


# ----------------------------------------------------------------------------------------- PruneMethod, pipeline


def _samplenet() -> nn.Module:
    return pipeline.load(str(SAMPLES / "samplenet.pt"), arch="samplenet").model


class _OwnCounts(L1):
    """A scorer that chooses its own keep counts at the alignment it is given, like cmi and mipp."""

    def score(self, ctx: ScoringContext) -> Scores:
        scores = super().score(ctx).scores
        keep = engine.allocate_uniform(ctx.model, ctx.example_input, ctx.groups, scores, target=ctx.target,
                                       metric=ctx.metric, min_keep=ctx.min_keep, round_to=ctx.round_to).keep
        return Scores(scores, keep=keep)


@pytest.mark.parametrize(("cls", "scorings"), [(L1, [1]), (_OwnCounts, [1, 2, 4, 8, 16, 32])])
def test_prune_method_scores_once_unless_the_scorer_chooses_its_own_counts(cls, scorings, monkeypatch) -> None:
    seen: list[int] = []
    score = cls.score
    monkeypatch.setattr(cls, "score", lambda self, ctx: seen.append(ctx.round_to) or score(self, ctx))
    model, example = _samplenet(), torch.zeros(1, 3, 32, 32)
    ctx = MethodContext(example=example, num_classes=10, device=torch.device("cpu"), seed=0,
                        budget=Budget(0.33, "filters", "auto"), original=model, latency=_fake_measure([]))
    result = cls().apply(model, ctx)
    assert seen == scorings
    assert result.report["alignment"]["chosen"] == 4
    assert all(g["aligned_to"] in (None, 4, 2, 1) for g in result.report["groups"])
    assert result.model(example).shape == (1, 10)


def test_latency_is_measured_on_the_graph_the_run_ships() -> None:
    example = torch.zeros(1, 3, 8, 8)
    prepared = pipeline.Prepared(example, 2, None, train=object(), calib=[(torch.ones(2, 3, 8, 8), torch.zeros(2))])
    cfg = CompressConfig(round_to="auto", bench_batches=(32, 1), threads=2, bench_repeats=7).validate()
    measure = pipeline.latency_measure(prepared, cfg)
    assert measure.describe() == {"graph": "int8", "batch": 32, "threads": 2, "repeats": 7}
    fp32 = pipeline.latency_measure(prepared, CompressConfig(round_to="auto", quantize="none", bench_batches=(4,)))
    assert (fp32.graph, fp32.batch, fp32.threads, fp32.calib) == ("fp32", 4, None, None)


def test_auto_is_the_default_and_without_a_benchmark_it_times_nothing_and_is_8() -> None:
    assert CompressConfig().round_to == "auto"
    model, example = _samplenet(), torch.zeros(1, 3, 32, 32)
    prepared = pipeline.Prepared(example, 10, None)
    ctx = pipeline.method_context(model, prepared, CompressConfig(bench_batches=()), L1(), torch.device("cpu"))
    assert ctx.budget.round_to == "auto" and ctx.latency is None
    untimed = L1().apply(model, ctx).report
    fixed = L1().apply(model, MethodContext(example=example, num_classes=10, device=torch.device("cpu"), seed=0,
                                            budget=Budget(0.33, "filters", 8), original=model)).report
    assert untimed["alignment"] == {"chosen": 8, "timed": False, "candidates": []}
    assert untimed["groups"] == fixed["groups"] and "alignment" not in fixed


def test_round_to_auto_through_compress_reports_every_candidate(monkeypatch, tmp_path: Path) -> None:
    described = []

    def fake_call(self, models):
        described.append(self.describe())
        return {k: FAKE_P50[k] for k in models}

    monkeypatch.setattr(widths.OnnxLatency, "__call__", fake_call)
    result = compress(str(SAMPLES / "samplenet.pt"), arch="samplenet", data=str(SAMPLES / "shapes_train_set.npz"),
                      normalize=NORMALIZE, method="l1", target=0.33, round_to="auto", epochs=0, bn_recalib=0,
                      quantize="none", bench_batches=(2,), bench_repeats=3, threads=1, out=tmp_path / "run")
    assert described == [{"graph": "fp32", "batch": 2, "threads": 1, "repeats": 3}]
    section = json.loads((tmp_path / "run" / "report.json").read_text())["method"]
    alignment = section["alignment"]
    assert alignment["chosen"] == 4 and alignment["timed"] and (alignment["graph"], alignment["batch"]) == ("fp32", 2)
    assert [c["round_to"] for c in alignment["candidates"]] == [1, 2, 4, 8, 16, 32]
    assert all(c["p50_ms"] == FAKE_P50[c["round_to"]] and c["macs"] > 0 and abs(c["achieved"] - 0.33) <= 0.02
               for c in alignment["candidates"])
    assert result.report["options"]["round_to"] == "auto"
    assert all(g["aligned_to"] in (None, 4, 2, 1) for g in section["groups"])


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(("value", "message"), [("0", "--round-to must be an integer >= 1 or auto"),
                                                 ("fast", "--round-to must be an integer >= 1 or auto")])
def test_a_bad_round_to_is_a_one_line_error(value: str, message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, [str(tmp_path / "m.pt"), "--round-to", value, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_round_to_auto_and_integers_reach_the_api(api_calls, tmp_path: Path) -> None:
    for value in ("auto", "AUTO", "16"):
        assert CliRunner().invoke(cli.app, [str(tmp_path / "m.pt"), "--round-to", value]).exit_code == 0
    assert CliRunner().invoke(cli.app, [str(tmp_path / "m.pt")]).exit_code == 0
    assert [c["round_to"] for c in api_calls] == ["auto", "auto", 16, "auto"]


def test_a_reference_model_is_exported_once_and_timed_in_every_call(monkeypatch) -> None:
    import exporters

    exported = []
    real = exporters.export_onnx

    def counting(model, path, example):
        exported.append(Path(path).name)
        return real(model, path, example)

    monkeypatch.setattr(exporters, "export_onnx", counting)
    monkeypatch.setattr(widths, "time_graphs", lambda paths, **kw: {name: 1.0 for name in paths})
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    measure = widths.OnnxLatency(torch.zeros(1, 3, 8, 8), reference=original)
    for _ in range(3):
        assert measure({0: original, 1: nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())}) == {0: 1.0, 1: 1.0}
    assert exported.count("reference.onnx") == 1 and exported.count("round_to_1.onnx") == 3
    assert "round_to_0.onnx" not in exported
