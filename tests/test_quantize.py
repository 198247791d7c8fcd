"""compressor.quantize on tiny conv nets exported with exporters.export_onnx: the quantised graph runs and is smaller,
the accuracy check keeps a layer that breaks under INT8 in float (or fails with nothing written), choose_format picks
the fastest candidate under a fake timer, and bad input is a one-line error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import compressor.quantize as quantize
from compressor.errors import CompressorError, InputError, ValidationError
from compressor.quantize import (
    Int8Format,
    agreement,
    choose_format,
    node_sensitivity,
    onnx_top1,
    quantize_int8,
    quantize_verified,
)
from exporters import BenchmarkResult, LatencyStats, export_onnx, make_session

pytest.importorskip("onnxruntime")

# 32-64 images: one flipped prediction is 1.6-3 points; a broken layer costs 40-70 points, an intact model 0-3.
MAX_DROP = 0.1


class SmallNet(nn.Module):
    """conv 3->c1, ReLU, conv c1->c2, ReLU, conv c2->c2, ReLU, global average pool, linear -> classes."""

    def __init__(self, c1: int = 16, c2: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1)
        self.head = nn.Linear(c2, classes)
        with torch.no_grad():  # no conv biases: features follow the input rather than a constant offset
            for conv in (self.conv1, self.conv2, self.conv3):
                conv.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def standardise_head(self, images: list[np.ndarray]) -> SmallNet:
        """Centre the head on the mean pooled features and scale it to their spread: pooled features of a random net
        are nearly constant across images, so without this every image lands in one class and top-1 checks nothing."""
        with torch.no_grad():
            feats = self.features(torch.from_numpy(np.concatenate(images)))
            self.head.weight *= 4.0 / feats.std()
            self.head.bias.copy_(-self.head.weight @ feats.mean(dim=0))
        return self


def _break(layer: nn.Conv2d | nn.Linear, before: nn.Conv2d) -> None:
    """Make ``layer`` break under INT8 weights, per-channel included: ``before``'s output channel 0 is dead (zero
    weights, bias -1, then ReLU), and ``layer`` gives that dead input a weight of 1e4 in every filter. Each filter's
    scale becomes 1e4/127, so all its real weights round to 0 and the layer outputs only its bias; in float the dead
    channel contributes nothing."""
    with torch.no_grad():
        before.weight[0] = 0.0
        before.bias[0] = -1.0
        layer.weight[:, 0] = 1e4


def _export(model: SmallNet, path: Path) -> Path:
    return export_onnx(model.eval(), path, torch.zeros(1, 3, 32, 32))


def _images(n: int, seed: int) -> list[np.ndarray]:
    """Noise around a random colour per image, so that the pooled features, hence the classes, differ by image."""
    rng = np.random.default_rng(seed)
    x = 0.5 * rng.standard_normal((n, 3, 32, 32)) + 2.0 * rng.standard_normal((n, 3, 1, 1))
    return list(x.astype(np.float32).reshape(n // 8, 8, 3, 32, 32))


def _labelled(path: Path, xs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Labels = the fp32 graph's own top-1, so fp32 accuracy is exactly 1."""
    session = make_session(path, threads=1)
    return [(x, session.run(None, {"input": x})[0].argmax(1)) for x in xs]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    images = _images(64, seed=3)
    plain = SmallNet().standardise_head(images)
    one = SmallNet()
    _break(one.conv2, one.conv1)
    one.standardise_head(images)
    two = SmallNet()  # two broken layers far apart: conv2, and the head (on conv3's dead channel 0)
    _break(two.conv2, two.conv1)
    _break(two.head, two.conv3)
    two.standardise_head(images)
    return {name: _export(model, folder / f"{name}.onnx") for name, model in
            (("plain", plain), ("one", one), ("two", two))}


@pytest.fixture(scope="module")
def calib() -> list[np.ndarray]:
    return _images(32, seed=1)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quantised_graph_runs_has_qdq_is_smaller_and_input_unchanged(graphs, calib, tmp_path) -> None:
    before = _digest(graphs["plain"])
    out = quantize_int8(graphs["plain"], tmp_path / "sub" / "plain.int8.onnx", calib, fmt=Int8Format())
    assert _digest(graphs["plain"]) == before
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert out.stat().st_size < 0.5 * graphs["plain"].stat().st_size
    logits = make_session(out, threads=1).run(None, {"input": calib[0]})[0]
    assert logits.shape == (8, 4) and np.isfinite(logits).all()
    assert agreement(graphs["plain"], out, calib) >= 0.9
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # no temp files left beside it


@pytest.mark.parametrize("activation", ["U8", "S8"])
def test_activation_type_is_the_requested_one(graphs, calib, tmp_path, activation) -> None:
    out = quantize_int8(graphs["plain"], tmp_path / "q.onnx", calib, fmt=Int8Format(activation=activation))
    model = onnx.load(str(out))
    zero_points = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    quant = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    assert zero_points[quant.input[2]].dtype == (np.uint8 if activation == "U8" else np.int8)


def test_sensitivity_ranks_the_broken_layer_first(graphs, calib) -> None:
    ranking = node_sensitivity(graphs["one"], calib, fmt=Int8Format())
    names = [name for name, _ in ranking]
    assert len(names) == 4  # three Conv and the Gemm
    assert ranking[0][1] > 0.5 > 0.05 > ranking[1][1]  # the broken conv alone wrecks the logits, no other does
    broken = _conv_names(graphs["one"])[1]
    assert names[0] == broken


def _node_names(path: Path, op_type: str) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == op_type]


def _conv_names(path: Path) -> list[str]:
    return _node_names(path, "Conv")


def test_plain_quantisation_fails_the_check_and_the_fallback_keeps_the_layer_float(graphs, calib, tmp_path) -> None:
    evaluation = _labelled(graphs["one"], _images(64, seed=2))
    assert onnx_top1(graphs["one"], evaluation) == 1.0
    plain = quantize_int8(graphs["one"], tmp_path / "plain.onnx", calib)
    assert onnx_top1(plain, evaluation) < 0.6  # INT8 without the fallback breaks
    result = quantize_verified(graphs["one"], tmp_path / "one.int8.onnx", calib=calib, eval_batches=evaluation,
                               fmt=Int8Format(), max_drop=MAX_DROP, fp32_accuracy=None)
    conv1, conv2, conv3 = _conv_names(graphs["one"])
    assert result.excluded == (conv2, conv3)  # conv3 quantises conv2's output: kept float so conv2 really is
    assert result.fp32_accuracy == 1.0 and result.accuracy is not None and result.accuracy >= 1 - MAX_DROP
    assert [a["excluded"] for a in result.attempts] == [0, 1]
    assert result.attempts[0]["drop"] > 0.4 and result.attempts[1]["drop"] <= MAX_DROP
    assert result.path.is_file() and onnx_top1(result.path, evaluation) == result.accuracy
    assert result.to_dict()["excluded"] == list(result.excluded)


def test_without_eval_data_the_check_is_agreement_on_calibration(graphs, calib, tmp_path) -> None:
    result = quantize_verified(graphs["one"], tmp_path / "one.int8.onnx", calib=calib, eval_batches=None,
                               fmt=Int8Format(), max_drop=MAX_DROP, fp32_accuracy=None)
    assert result.accuracy is None and result.agreement >= 1 - MAX_DROP
    assert result.excluded[0] == _conv_names(graphs["one"])[1] and result.attempts[0]["drop"] > 0.3
    assert [a["excluded"] for a in result.attempts] == [0, 1]


@pytest.mark.parametrize("model, max_excluded, shown", [("one", 0, "max_excluded=0"), ("two", 1, "the 1 most")])
def test_when_it_cannot_pass_it_raises_one_line_and_writes_nothing(graphs, calib, tmp_path, model, max_excluded,
                                                                   shown) -> None:
    out = tmp_path / "x.int8.onnx"
    with pytest.raises(ValidationError) as info:
        quantize_verified(graphs[model], out, calib=calib, eval_batches=None, fmt=Int8Format(), max_drop=MAX_DROP,
                          fp32_accuracy=None, max_excluded=max_excluded)
    message = str(info.value)
    assert "\n" not in message and shown in message and "--max-accuracy-drop" in message
    assert list(tmp_path.iterdir()) == []


def test_two_broken_layers_pass_with_two_kept_float(graphs, calib, tmp_path) -> None:
    result = quantize_verified(graphs["two"], tmp_path / "two.int8.onnx", calib=calib, eval_batches=None,
                               fmt=Int8Format(), max_drop=MAX_DROP, fp32_accuracy=None)
    conv2, gemm = _conv_names(graphs["two"])[1], _node_names(graphs["two"], "Gemm")[0]
    assert set(result.excluded[:2]) == {conv2, gemm}
    assert [a["excluded"] for a in result.attempts] == [0, 1, 2] and result.attempts[1]["drop"] > MAX_DROP


def test_an_excluded_conv_really_runs_in_float(graphs, calib, tmp_path) -> None:
    """onnxruntime's WeightBiasQuantization would quantise the float weights of a Conv left between Q/DQ nodes
    when the session loads; the logits with and without that transformer must be the same."""
    import onnxruntime as ort

    conv2 = _conv_names(graphs["plain"])[1]
    out = quantize_int8(graphs["plain"], tmp_path / "q.onnx", calib, exclude=[conv2])
    assert conv2 in {n.name for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"}

    def logits(disabled: list[str]) -> np.ndarray:
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return session.run(None, {"input": calib[0]})[0]

    np.testing.assert_array_equal(logits([]), logits(["WeightBiasQuantization"]))


def _fake_benchmark(p50: dict[str, float], seen: dict[str, str]):
    def fake(models, *, batch_sizes, threads, repeats, **_):
        for name, path in models.items():  # the candidates are real, distinct files at timing time
            seen[name] = _digest(Path(path))
        row = {name: LatencyStats.from_seconds([p50[name] / 1e3], batch_size=batch_sizes[0]) for name in models}
        return BenchmarkResult({batch_sizes[0]: row}, {n: ["CPUExecutionProvider"] for n in models}, threads,
                               "fake", "cpu")
    return fake


@pytest.mark.parametrize("fastest", ["U8", "S8"])
def test_choose_format_picks_the_fastest_and_records_every_candidate(graphs, calib, monkeypatch, fastest) -> None:
    p50 = {"fp32": 3.0, "U8": 2.0, "S8": 2.0}
    p50[fastest] = 1.0
    seen: dict[str, str] = {}
    monkeypatch.setattr(quantize, "benchmark_latency", _fake_benchmark(p50, seen))
    fmt, timing = choose_format(graphs["plain"], calib, batch=4, threads=1, base=Int8Format(calibration="entropy"))
    assert fmt == Int8Format(activation=fastest, calibration="entropy")
    assert timing["chosen"] == fastest and timing["batch"] == 4 and timing["p50_ms"] == pytest.approx(p50)
    assert timing["speedup"][fastest] == pytest.approx(3.0)
    assert set(seen) == {"fp32", "U8", "S8"} and len(set(seen.values())) == 3


def test_bad_input_is_a_one_line_error(graphs, calib, tmp_path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model\xff" * 10)
    cases = [
        lambda: quantize_int8(tmp_path / "missing.onnx", tmp_path / "o.onnx", calib),
        lambda: quantize_int8(junk, tmp_path / "o.onnx", calib),
        lambda: quantize_int8(graphs["plain"], graphs["plain"], calib),
        lambda: quantize_int8(graphs["plain"], tmp_path / "o.onnx", [np.zeros((8, 3, 32, 32), np.uint8)]),
        lambda: quantize_int8(graphs["plain"], tmp_path / "o.onnx", []),
        lambda: quantize_int8(graphs["plain"], tmp_path / "o.onnx", calib, exclude=["no_such_node"]),
        lambda: quantize_verified(graphs["plain"], tmp_path / "o.onnx", calib=calib, eval_batches=None,
                                  fmt=Int8Format(), max_drop=1.5, fp32_accuracy=None),
        lambda: onnx_top1(tmp_path / "missing.onnx", []),
        lambda: Int8Format(activation="S8", weight="U8"),
        lambda: Int8Format(calibration="kl"),
    ]
    for case in cases:
        with pytest.raises(CompressorError) as info:
            case()
        assert isinstance(info.value, InputError) and "\n" not in str(info.value), str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]
