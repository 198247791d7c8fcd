"""Issue 17 item 5: an ONNX graph as input, converted with onnx2torch, compressed, re-exported, and checked against
the *input* graph in onnxruntime (report ``model.onnx_input``).

Without onnx2torch only the missing-package error is tested; the rest skips with a message (:mod:`tests.hub_imports`).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from compressor import cli, load_compressed
from compressor.io import load_model
from exporters import export_onnx
from tests.hub_imports import require

RUNNER = CliRunner()
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
FAST = ["--method", "l1", "--target", "0.33", "--round-to", "1", "--bench-batch", "none", "--bn-recalib", "0",
        "--calib-samples", "16", "--json"]


class UserNet(nn.Module):
    """A user's CNN: BatchNorm, a residual add, max-pooling and a hard-coded ``view`` flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.fc = nn.Linear(24 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(x)))
        x = nn.functional.max_pool2d(torch.relu(self.c3(x)), 2)
        return self.fc(x.view(x.size(0), 24 * 8 * 8))


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("onnx") / "noise.npz"
    np.savez(path, x=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), y=np.arange(48) % 10)
    return path


def _run(model: Path, out: Path, *extra: object):
    return RUNNER.invoke(cli.app, [str(model), *[str(e) for e in extra], "--out", str(out)])


def _unsupported_graph(path: Path) -> Path:
    """Conv -> Mish (a standard ONNX operator since opset 18 that onnx2torch 1.5 lacks) -> pool -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Mish", ["c"], ["m"]),
             helper.make_node("GlobalAveragePool", ["m"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "mish", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_missing_onnx2torch_is_one_line_exit_2_with_the_install(tmp_path: Path, noise: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # as if absent, whether or not it is installed
    graph = _unsupported_graph(tmp_path / "m.onnx")
    out = tmp_path / "out"
    result = _run(graph, out, "--data", noise)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.stderr.split())
    assert "needs onnx2torch, which is not installed" in flat and "compressor[onnx-input]" in flat
    assert "Traceback" not in result.output and not out.exists()


def test_unsupported_operator_is_named_exit_2_nothing_written(tmp_path: Path, noise: Path) -> None:
    require("onnx2torch")
    graph = _unsupported_graph(tmp_path / "mish.onnx")
    out = tmp_path / "out"
    result = _run(graph, out, "--data", noise, *FAST)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.stderr.split())
    assert "cannot convert to PyTorch: Mish (opset 18)" in flat
    assert "Traceback" not in result.output and not out.exists()


def test_arch_with_an_onnx_model_is_refused(tmp_path: Path) -> None:
    require("onnx2torch")
    with pytest.raises(ValueError, match="ONNX graph, which holds its architecture"):
        load_model(_unsupported_graph(tmp_path / "m.onnx"), arch="resnet20")


def test_round_trip_on_the_tools_own_onnx(tmp_path: Path) -> None:
    """samplenet exported by the tool's exporter (opset 20, dynamic batch) -> compress -> parity against the input
    graph in the report, compressed.onnx verified, compressed.pt rebuilt from the input file."""
    require("onnx2torch")
    original = load_model(SAMPLES / "samplenet.pt").model.eval()
    graph = export_onnx(original, tmp_path / "samplenet.onnx", torch.zeros(1, 3, 32, 32))
    out = tmp_path / "out"
    data = SAMPLES / "shapes_test_set.npz"
    result = _run(graph, out, "--data", data, "--normalize", "0.5,0.5,0.5/0.5,0.5,0.5", "--quantize", "none", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    source = report["model"]["onnx_input"]
    assert source["opset"] == 20 and source["converter"].startswith("onnx2torch")
    assert source["parity"]["ok"] and source["parity"]["top1_agreement"] == 1.0 and source["parity"]["n_samples"] > 0
    assert report["parity"]["ok"] and abs(report["method"]["achieved"] - 0.33) <= 0.02
    # the same network (BatchNorm is folded into the convs by the export, so compare filters, not parameters)
    assert report["original"]["filters"] == sum(m.out_channels for m in original.modules() if isinstance(m, nn.Conv2d))
    rebuilt = load_compressed(out / "compressed.pt")
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "compressed.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = rebuilt(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected,
                               atol=1e-4, rtol=1e-4)


def test_user_model_at_opset_13_with_fixed_batch_is_compressed_and_quantised(tmp_path: Path, noise: Path) -> None:
    """A user's model exported by the legacy TorchScript exporter at opset 13 with a fixed batch of 1 and a constant
    flatten shape: the flatten becomes batch-free, the conversion is checked one image at a time against the
    input graph, and --quantize int8 writes a verified INT8 graph."""
    require("onnx2torch")
    torch.manual_seed(0)
    model = UserNet().eval()
    graph = tmp_path / "user13.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(graph), dynamo=False, opset_version=13)
    assert onnx.load(str(graph)).opset_import[0].version == 13
    out = tmp_path / "out"
    result = _run(graph, out, "--data", noise, "--quantize", "int8", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    source = report["model"]["onnx_input"]
    assert source["opset"] == 13 and source["parity"]["ok"] and source["parity"]["n_samples"] == 48
    assert report["parity"]["ok"] and abs(report["method"]["achieved"] - 0.33) <= 0.02
    assert (out / "compressed.int8.onnx").exists() and report["int8"] is not None
    layers = {row["name"]: row for row in report["layers"]}
    fc = next(row for row in layers.values() if row["type"] == "Linear")
    assert fc["in_after"] < fc["in_before"] == 24 * 8 * 8  # c3 was pruned through the flatten into the classifier
