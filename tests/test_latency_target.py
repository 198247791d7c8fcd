"""``--target-latency``: the least compression that meets a measured latency budget (compressor.latency_target),
through the search, the pipeline, the API and the CLI. Timers are fakes, so every search is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn
from typer.testing import CliRunner

from compressor import cli, compress, widths
from compressor.errors import PruningError
from compressor.latency_target import Built, search_target
from compressor.metrics import count_macs

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NORMALIZE = "0.5,0.5,0.5/0.5,0.5,0.5"


class _Stub(nn.Module):
    """A 'model' that only carries the fraction it was compressed by."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t


def _timer(ratio, calls: list[float] | None = None):
    """Times the original (key 0) at 10 ms and a probe at ``10 * ratio(t)`` ms."""

    def timer(models):
        assert set(models) == {0, 1}, "the original and the probe are timed in one call"
        if calls is not None:
            calls.append(models[1].t)
        return {0: 10.0, 1: 10.0 * ratio(models[1].t)}

    return timer


def _build(t: float) -> Built:
    return Built(_Stub(t), achieved=t, macs=int(1000 * (1 - t)))


def test_search_finds_the_least_compression_meeting_the_budget_and_records_every_probe() -> None:
    calls: list[float] = []
    choice = search_target(_build, _timer(lambda t: 1.0 - t, calls), _Stub(0.0), 0.55, high=0.8, probes=3)
    assert calls[:3] == [0.2, 0.4, 0.6]  # the grid stops at the first hit
    assert len(calls) == 6 and len(choice.probes) == 6
    met = [p.target for p in choice.probes if p.ratio <= 0.55]
    assert choice.chosen.target == min(met) and choice.chosen.ratio <= 0.55
    assert 0.45 <= choice.chosen.target <= 0.45 + 0.2 / 2 ** 3 + 1e-9  # bisection brackets the exact answer, 0.45
    assert choice.built.model.t == choice.chosen.target
    section = choice.section(graph="int8", batch=1)
    assert section["target"] == round(choice.chosen.target, 4) and section["graph"] == "int8"
    assert [p["met"] for p in section["probes"]] == [p.ratio <= 0.55 for p in choice.probes]


def test_a_budget_out_of_reach_is_one_error_with_the_best_ratio() -> None:
    with pytest.raises(PruningError, match=r"--target-latency 0.5 is out of reach.*0.76x.*4 probes"):
        search_target(_build, _timer(lambda t: 1.0 - 0.3 * t), _Stub(0.0), 0.5, high=0.8)


def test_latency_that_rises_again_at_extreme_fractions_does_not_hide_the_answer() -> None:
    # fastest around 0.4, slower again beyond (tiny layers, per-node overhead): a search from the top would miss it
    choice = search_target(_build, _timer(lambda t: 0.6 + abs(t - 0.4)), _Stub(0.0), 0.7, high=0.8)
    assert choice.chosen.ratio <= 0.7 and 0.3 <= choice.chosen.target <= 0.4


def test_an_unreachable_fraction_ends_the_grid() -> None:
    def build(t: float) -> Built:
        if t > 0.5:
            raise PruningError(f"target {t} is not reachable")
        return _build(t)

    calls: list[float] = []
    with pytest.raises(PruningError, match="out of reach"):
        search_target(build, _timer(lambda t: 1.0 - 0.5 * t, calls), _Stub(0.0), 0.7, high=0.8)
    assert calls == [0.2, 0.4]


def test_a_noisy_non_monotone_ratio_still_returns_a_probe_that_met() -> None:
    wobble = {True: 0.05, False: -0.05}
    choice = search_target(_build, _timer(lambda t: 1.0 - t + wobble[int(t * 1000) % 2 == 0]), _Stub(0.0), 0.5)
    assert choice.chosen.ratio <= 0.5 and choice.chosen in choice.probes


# ------------------------------------------------------------------------------------------- through compress


def _macs_timer(monkeypatch, described: list[dict]) -> None:
    """Latency proportional to MACs: deterministic and monotone in the fraction removed."""

    def fake_call(self, models):
        described.append(self.describe())
        return {k: float(count_macs(m, self.example)) / 1e3 for k, m in models.items()}

    monkeypatch.setattr(widths.OnnxLatency, "__call__", fake_call)


def test_target_latency_through_compress_reports_the_probes_and_the_chosen_target(monkeypatch,
                                                                                    tmp_path: Path) -> None:
    described: list[dict] = []
    _macs_timer(monkeypatch, described)
    result = compress(str(SAMPLES / "samplenet.pt"), arch="samplenet", data=str(SAMPLES / "shapes_train_set.npz"),
                      normalize=NORMALIZE, method="l1", target_latency=0.6, round_to=4, epochs=0, bn_recalib=0,
                      quantize="none", bench_batches=(2,), bench_repeats=3, threads=1, out=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    search = report["method"]["latency_target"]
    assert search["goal"] == 0.6 and (search["graph"], search["batch"]) == ("fp32", 2)
    assert len(search["probes"]) >= 2 and all(d["batch"] == 2 for d in described)
    chosen = [p for p in search["probes"] if p["target"] == search["target"]]
    assert chosen and chosen[0]["met"] and chosen[0]["ratio"] <= 0.6
    assert not any(p["met"] and p["target"] < search["target"] for p in search["probes"])
    assert report["method"]["target"] == search["target"]
    macs_ratio = report["compressed"]["macs"] / report["original"]["macs"]
    assert macs_ratio == pytest.approx(chosen[0]["ratio"], abs=1e-3)  # the fake latency is the MACs
    assert result.report["options"]["target_latency"] == 0.6
    assert "Latency budget: 0.6" in (tmp_path / "run" / "report.md").read_text()


def test_with_round_to_auto_the_first_probe_picks_the_alignment_and_the_rest_keep_it(monkeypatch,
                                                                                     tmp_path: Path) -> None:
    described: list[dict] = []
    _macs_timer(monkeypatch, described)
    result = compress(str(SAMPLES / "samplenet.pt"), arch="samplenet", data=str(SAMPLES / "shapes_train_set.npz"),
                      normalize=NORMALIZE, method="l1", target_latency=0.7, round_to="auto", epochs=0,
                      bn_recalib=0, quantize="none", bench_batches=(1,), bench_repeats=3, threads=1, out=None)
    search = result.report["method"]["latency_target"]
    assert isinstance(search["round_to"], int) and search["round_to"] in widths.DEFAULT_CANDIDATES
    candidates_timed = [d for d in described if d["batch"] == 1]
    assert len(candidates_timed) == 1 + len(search["probes"])  # one alignment choice, then one call per probe
    assert all(g["aligned_to"] in (None, *range(1, search["round_to"] + 1)) for g in result.report["method"]["groups"])


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "0.3", "--target-latency", "0.5"], "give --target or --target-latency, not both"),
    (["--target-latency", "1.5"], "--target-latency is a fraction of the original's latency in (0, 1)"),
    (["--target-latency", "0.5", "--bench-batch", "none"], "--target-latency times the compressed graphs"),
])
def test_bad_target_latency_is_a_one_line_error_and_writes_nothing(args: list[str], message: str,
                                                                   tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, [str(SAMPLES / "samplenet.pt"), "--arch", "samplenet", *args,
                                          "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_without_target_latency_the_cli_target_defaults_to_a_third(api_calls, tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    for args in ([], ["--target", "0.5"], ["--target-latency", "0.4"]):
        assert CliRunner().invoke(cli.app, [str(model), *args]).exit_code == 0
    seen = [(c.get("target"), c["target_latency"], c["out"].name) for c in api_calls]
    assert seen == [(None, None, "m-l1-0.33"), (0.5, None, "m-l1-0.5"), (None, 0.4, "m-l1-latency0.4")]
