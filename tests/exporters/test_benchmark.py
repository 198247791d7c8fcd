"""benchmark_latency on two tiny hand-built ONNX graphs (no torch export, tiny repeats; no timing ratios asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters.benchmark as exporters_benchmark
from exporters import BenchmarkResult, ExportError, LatencyStats, benchmark_latency

ort = pytest.importorskip("onnxruntime")

SHAPE = (3, 8, 8)


def _conv_net(path: Path, *, width: int, batch: int | str = "batch") -> Path:
    """input (batch, 3, 8, 8) -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> logits (batch, width)."""
    weight = np.random.default_rng(width).standard_normal((width, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, width])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("graphs")
    return {
        "baseline": _conv_net(folder / "baseline.onnx", width=16),
        "pruned": _conv_net(folder / "pruned.onnx", width=4),
        "fixed": _conv_net(folder / "fixed.onnx", width=4, batch=1),
    }


def test_benchmark_reports_both_models_at_both_batch_sizes(graphs):
    models = {"baseline": graphs["baseline"], "pruned": graphs["pruned"]}
    result = benchmark_latency(models, input_shape=SHAPE, batch_sizes=(1, 4), threads=1, warmup=1, repeats=5)
    assert isinstance(result, BenchmarkResult)
    assert sorted(result.latency) == [1, 4]
    for batch, row in result.latency.items():
        assert sorted(row) == ["baseline", "pruned"]
        for stats in row.values():
            assert stats.n == 5
            assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
            assert stats.mean_ms > 0 and stats.std_ms >= 0
            assert stats.throughput_ips == pytest.approx(batch * 1e3 / stats.mean_ms)
    for providers in result.providers.values():
        assert "CPUExecutionProvider" in providers
    assert result.device == "cpu" and result.threads == 1
    assert result.onnxruntime_version == ort.__version__
    expected = result.latency[4]["baseline"].p50_ms / result.latency[4]["pruned"].p50_ms
    assert result.speedup(4, "baseline", "pruned") == pytest.approx(expected)
    data = json.loads(json.dumps(result.to_dict()))
    assert sorted(data["latency"]) == ["1", "4"]
    assert data["latency"]["1"]["pruned"]["n"] == 5


def test_input_shape_is_read_from_the_graph_and_min_time_adds_rounds(graphs):
    result = benchmark_latency({"pruned": graphs["pruned"]}, batch_sizes=(2,), warmup=0, repeats=1, min_time_s=0.02)
    assert result.latency[2]["pruned"].n > 1


def test_timing_is_interleaved_after_warmup():
    calls: list[str] = []

    class FakeSession:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, outputs: object, feed: object) -> None:
            calls.append(self.name)

    runs = [(name, FakeSession(name), {}) for name in ("a", "b")]
    seconds = exporters_benchmark._time_interleaved(runs, warmup=2, repeats=3, min_time_s=None)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(seconds[name]) for name in ("a", "b")] == [3, 3]


def test_latency_stats_from_known_durations():
    stats = LatencyStats.from_seconds([0.001, 0.002, 0.003, 0.004], batch_size=2)
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.mean_ms == pytest.approx(2.5)
    assert stats.std_ms == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert stats.throughput_ips == pytest.approx(800.0)
    assert stats.n == 4


def test_speedup_with_unknown_names_is_an_error():
    stats = LatencyStats.from_seconds([0.001], batch_size=1)
    result = BenchmarkResult({1: {"a": stats}}, {"a": ["CPUExecutionProvider"]}, None, "x", "cpu")
    with pytest.raises(ExportError, match="no model named 'b'"):
        result.speedup(1, "a", "b")
    with pytest.raises(ExportError, match="no timings for batch 8"):
        result.speedup(8, "a", "a")


def test_fixed_batch_graph_and_wrong_shape_are_explained(graphs):
    with pytest.raises(ExportError, match="fixed batch of 1"):
        benchmark_latency({"fixed": graphs["fixed"]}, input_shape=SHAPE, batch_sizes=(4,), repeats=1)
    with pytest.raises(ExportError, match="input_shape"):
        benchmark_latency({"pruned": graphs["pruned"]}, input_shape=(3, 16, 16), batch_sizes=(1,), repeats=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"batch_sizes": (1, 1)}, "duplicates"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"min_time_s": 0}, "min_time_s"),
        ({"device": "tpu"}, "device must be one of"),
    ],
)
def test_argument_errors(graphs, kwargs, message):
    with pytest.raises(ExportError, match=message):
        benchmark_latency({"pruned": graphs["pruned"]}, input_shape=SHAPE, **kwargs)


def test_empty_models_is_an_error():
    with pytest.raises(ExportError, match="non-empty"):
        benchmark_latency({}, input_shape=SHAPE)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA available: CPU-only error path untestable"
)
def test_cuda_requested_on_a_cpu_build_is_an_error(graphs):
    with pytest.raises(ExportError, match="device 'cuda' requested"):
        benchmark_latency({"pruned": graphs["pruned"]}, input_shape=SHAPE, device="cuda", repeats=1)
