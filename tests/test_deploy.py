"""The INT8 deployment stage through the pipeline: both graphs quantised the same way, the 2x2 report, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from compressor import cli, compress
from compressor.models import create_model

from .conftest import SAMPLES

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    result = compress(SAMPLES / "samplenet.pt", arch="samplenet", data=SAMPLES / "shapes_train_set.npz",
                      eval_data=SAMPLES / "shapes_test_set.npz", normalize="0.5,0.5,0.5/0.5,0.5,0.5", method="l1",
                      target=0.33, bench_batches=(1,), bench_repeats=3, calib_samples=64, out=out)
    return result, out


def test_both_graphs_are_quantised_and_written(sample_run) -> None:
    result, out = sample_run
    for name in ("original", "compressed"):
        path = out / f"{name}.int8.onnx"
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
        assert path.stat().st_size < (out / f"{name}.onnx").stat().st_size
    q = result.report["int8"]
    assert q["format"]["activation"] in ("U8", "S8") and q["format_choice"]
    for side in ("original", "compressed"):
        fp32 = q[side]["fp32_accuracy"]  # the fp32 ONNX graph's own top-1: like with like
        assert abs(fp32 - result.report[side]["accuracy"]) <= 0.01 and fp32 - q[side]["accuracy"] <= 0.01 + 1e-9
        assert 0.0 <= q[side]["agreement"] <= 1.0 and isinstance(q[side]["excluded"], list)


def test_the_report_shows_the_two_by_two(sample_run) -> None:
    result, out = sample_run
    lat = result.report["latency"]["1"]
    assert {"original", "compressed", "original.int8", "compressed.int8"} <= set(lat)
    assert lat["int8_gain"] == pytest.approx(lat["original.int8"]["p50_ms"] / lat["compressed.int8"]["p50_ms"],
                                             rel=1e-3)
    assert set(lat["speedups"]) == {"compressed", "original.int8", "compressed.int8"}
    markdown = (out / "report.md").read_text()
    assert "## Deployment: fp32 and INT8, original and compressed" in markdown
    for label in ("original fp32", "original INT8", "compressed fp32", "compressed INT8"):
        assert f"| {label} |" in markdown
    saved = json.loads((out / "report.json").read_text())
    assert saved["int8"]["compressed"]["onnx_bytes"] == (out / "compressed.int8.onnx").stat().st_size


def test_without_data_auto_skips_int8() -> None:
    result = compress(SAMPLES / "samplenet.pt", arch="samplenet", method="l1", target=0.3, bench_batches=())
    assert result.report["int8"] is None and result.report["compressed"]["params"] > 0


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    import torch

    path = tmp_path / "m.pt"
    torch.save(create_model("samplenet").state_dict(), path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8"], "--quantize int8 calibrates on images of --data"),
    (["--max-accuracy-drop", "-1"], "--max-accuracy-drop is in percentage points"),
    (["--max-accuracy-drop", "101"], "--max-accuracy-drop is in percentage points"),
    (["--quantize", "int4"], "--quantize must be one of auto, int8, none"),
])
def test_bad_quantisation_input_is_one_line_exit_2(args: list[str], message: str, model_file: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = RUNNER.invoke(cli.app, [str(model_file), "--arch", "samplenet", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_numpy_batches_match_the_loaders() -> None:
    from compressor import pipeline
    from compressor.config import CompressConfig
    from compressor.methods import build_method

    cfg = CompressConfig(calib_samples=32, batch_size=16)
    loaded = pipeline.load(SAMPLES / "samplenet.pt", arch="samplenet")
    prepared = pipeline.prepare(loaded, SAMPLES / "shapes_train_set.npz", SAMPLES / "shapes_test_set.npz",
                                normalize="0.5,0.5,0.5/0.5,0.5,0.5", cfg=cfg, method=build_method("l1"))
    calib, evals = prepared.numpy_batches()
    assert sum(len(x) for x in calib) == 32 and all(x.dtype == np.float32 for x in calib)
    assert evals is not None and sum(len(y) for _, y in evals) == len(prepared.test)
    assert prepared.quantizes(cfg) and not prepared.quantizes(CompressConfig(quantize="none"))


def _fail_compressed(monkeypatch: pytest.MonkeyPatch) -> None:
    import compressor.quantize as q
    from compressor.errors import ValidationError

    real = q.quantize_verified

    def flaky(fp32, out, **kwargs):
        if Path(out).name == "compressed.int8.onnx":
            raise ValidationError("INT8 top-1 drops 5.0 points, more than the 1.0 allowed")
        return real(fp32, out, **kwargs)

    monkeypatch.setattr(q, "quantize_verified", flaky)


def test_auto_ships_fp32_and_reports_an_int8_graph_that_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fail_compressed(monkeypatch)
    out = tmp_path / "run"
    result = compress(SAMPLES / "samplenet.pt", arch="samplenet", data=SAMPLES / "shapes_train_set.npz",
                      normalize="0.5,0.5,0.5/0.5,0.5,0.5", method="l1", target=0.33, bench_batches=(1,),
                      bench_repeats=2, calib_samples=64, out=out)
    assert "drops 5.0 points" in result.report["int8"]["compressed"]["failed"]
    assert not (out / "compressed.int8.onnx").exists() and (out / "original.int8.onnx").exists()
    assert "compressed.int8" not in result.report["latency"]["1"] and "original.int8" in result.report["latency"]["1"]
    assert "failed its check, not shipped" in (out / "report.md").read_text()


def test_int8_required_fails_the_run_and_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from compressor.errors import ValidationError

    _fail_compressed(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(ValidationError, match="drops 5.0 points"):
        compress(SAMPLES / "samplenet.pt", arch="samplenet", data=SAMPLES / "shapes_train_set.npz",
                 normalize="0.5,0.5,0.5/0.5,0.5,0.5", method="l1", target=0.33, bench_batches=(), calib_samples=64,
                 quantize="int8", out=out)
    assert not out.exists() and not list(tmp_path.glob(".compressor-stage-*"))
