"""export_onnx, check_parity, make_session and runtime_info on tiny CNNs (CPU, a few seconds)."""

from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.external_data_helper import uses_external_data
from torch import nn

import exporters
import exporters.runtime as exporters_runtime
from compressor.models.layers import ChannelShortcut
from exporters import (
    ExportError,
    ParityError,
    ParityReport,
    RuntimeConflictError,
    RuntimeMissingError,
    check_parity,
    export_onnx,
    make_session,
    runtime_info,
)

ort = pytest.importorskip("onnxruntime")

SHAPE = (3, 8, 8)
CUDA_AVAILABLE = "CUDAExecutionProvider" in ort.get_available_providers()


class TinyNet(nn.Module):
    """conv + BN + ReLU + max-pool + global pool + linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class ShortcutNet(nn.Module):
    """Residual block whose shortcut is a ChannelShortcut (3 -> 4 channels, stride 2)."""

    def __init__(self, *, gather: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = ChannelShortcut(3, 4, stride=2)
        if gather:
            self.shortcut.src = [2, -1, 0, 1]  # not one run of consecutive inputs: index_select path
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)) + self.shortcut(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class TwoOutputs(TinyNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        y = super().forward(x)
        return y, y


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in forward")


class FixedBatch(TinyNet):
    """Bakes the batch size into a reshape, which the exporter specialises silently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).reshape(2, -1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics so that folding errors would show up in parity."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet() if kind == "tiny" else ShortcutNet(gather=kind == "gather")
    return _randomise_bn(model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Each kind exported once, alone in its own directory; models left in train mode on purpose."""
    out = {}
    for kind in ("tiny", "contiguous", "gather"):
        model = _build(kind).train()
        folder = tmp_path_factory.mktemp(kind)
        path = export_onnx(model, folder / "model.onnx", torch.randn(2, *SHAPE))
        out[kind] = (model, path)
    return out


def _batches(*sizes: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(n, *SHAPE, generator=generator) for n in sizes]


@pytest.mark.parametrize("kind", ["tiny", "contiguous", "gather"])
def test_export_is_one_checked_file_with_dynamic_batch(exported, kind):
    model, path = exported[kind]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"], "temp or .data files left behind"
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(uses_external_data(t) for t in proto.graph.initializer)
    onnx.checker.check_model(str(path), full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert str(Path(__file__).parent).encode() not in path.read_bytes(), "source paths leaked into the ONNX file"
    assert model.training and all(m.training for m in model.modules()), "train/eval flags not restored"

    session = make_session(path, threads=1)
    for n in (1, 5):
        (logits,) = session.run(None, {"input": np.random.default_rng(n).standard_normal((n, *SHAPE), np.float32)})
        assert logits.shape == (n, model.fc.out_features)


def test_gather_model_takes_the_gather_path(exported):
    model, path = exported["gather"]
    assert model.shortcut._contiguous_plan() is None
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Gather" in ops


@pytest.mark.parametrize("kind", ["tiny", "contiguous", "gather"])
def test_parity_ok(exported, kind):
    model, path = exported[kind]
    report = check_parity(model, path, _batches(1, 5, 3), atol=1e-4)
    assert report.n_samples == 9
    assert report.max_abs_diff <= 1e-4
    assert report.top1_agreement == 1.0
    assert report.ok
    assert "CPUExecutionProvider" in report.providers
    report.raise_if_failed()
    assert report.to_dict()["ok"] is True
    assert model.training, "check_parity must restore train mode"


def test_parity_failure_is_reported_then_raised(exported):
    model, path = exported["tiny"]
    perturbed = _build("tiny").eval()
    with torch.no_grad():
        perturbed.fc.weight.add_(0.5)
    report = check_parity(perturbed, path, _batches(4, 4))
    assert not report.ok
    assert report.max_abs_diff > 1e-4
    with pytest.raises(ParityError, match="max abs diff"):
        report.raise_if_failed()


def test_report_ok_logic():
    providers = ("CPUExecutionProvider",)
    assert ParityReport(1e-5, 1.0, 4, 1e-4, providers).ok
    assert not ParityReport(1e-5, 0.75, 4, 1e-4, providers).ok  # top-1 disagreement alone fails
    assert not ParityReport(float("nan"), 1.0, 4, 1e-4, providers).ok
    with pytest.raises(ParityError, match=r"75\.00%"):
        ParityReport(1e-5, 0.75, 4, 1e-4, providers).raise_if_failed()


def test_shape_and_output_count_mismatch_are_fatal(exported):
    _, path = exported["tiny"]
    with pytest.raises(ParityError, match="shape"):
        check_parity(TinyNet(num_classes=7), path, _batches(2))
    with pytest.raises(ParityError, match="2 outputs"):
        check_parity(TwoOutputs(), path, _batches(2))


def test_parity_rejects_no_samples_and_bad_atol(exported):
    model, path = exported["tiny"]
    with pytest.raises(ExportError, match="no samples"):
        check_parity(model, path, [])
    with pytest.raises(ExportError, match="atol"):
        check_parity(model, path, _batches(1), atol=-1.0)


def test_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="boom in forward"):
        export_onnx(Boom(), target, torch.randn(1, *SHAPE))
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert target.read_bytes() == b"previous export"


def test_silently_fixed_batch_is_rejected(tmp_path):
    with pytest.raises(ExportError, match="fixed the batch axis to 2"):
        export_onnx(FixedBatch(), tmp_path / "model.onnx", torch.randn(2, *SHAPE))
    assert list(tmp_path.iterdir()) == []


def test_export_is_quiet(tmp_path, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(TinyNet(), tmp_path / "quiet.onnx", torch.randn(1, *SHAPE), dynamic_batch=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [str(w.message) for w in caught] == []


def test_export_argument_errors(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(TinyNet(), tmp_path / "missing" / "m.onnx", torch.randn(1, *SHAPE))
    with pytest.raises(ExportError, match="floating-point"):
        export_onnx(TinyNet(), tmp_path / "m.onnx", torch.ones(1, *SHAPE, dtype=torch.long))
    with pytest.raises(ExportError, match="nn.Module"):
        export_onnx(lambda x: x, tmp_path / "m.onnx", torch.randn(1, *SHAPE))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(CUDA_AVAILABLE, reason="CUDA provider available: the CPU-only error path cannot be tested")
def test_cuda_requested_without_cuda_is_a_clear_error(exported):
    _, path = exported["tiny"]
    with pytest.raises(ExportError, match="device 'cuda' requested"):
        make_session(path, device="cuda")
    assert "CPUExecutionProvider" in make_session(path, device="auto").get_providers()


def test_silent_provider_fallback_is_detected(exported):
    # What onnxruntime-gpu does without a usable CUDA: the session quietly runs on CPU. Read-back must catch it.
    _, path = exported["tiny"]
    with pytest.raises(ExportError, match="fell back silently"):
        exporters_runtime.create_session(
            ort, path, ["CPUExecutionProvider"], threads=1, required=["CUDAExecutionProvider"]
        )


def test_session_argument_errors(exported, tmp_path):
    _, path = exported["tiny"]
    with pytest.raises(ExportError, match="device must be one of"):
        make_session(path, device="gpu")
    with pytest.raises(ExportError, match="threads"):
        make_session(path, threads=0)
    with pytest.raises(ExportError, match="cannot load"):
        make_session(tmp_path / "absent.onnx")


def test_both_runtimes_installed_is_a_conflict(exported, monkeypatch):
    _, path = exported["tiny"]
    fake = {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"}
    monkeypatch.setattr(exporters_runtime, "_dist_version", fake.get)
    with pytest.raises(RuntimeConflictError, match="pip uninstall -y onnxruntime onnxruntime-gpu") as info:
        make_session(path)
    assert "\n" not in str(info.value)
    assert runtime_info()["conflict"] is True


def test_missing_runtime_says_how_to_install(exported, monkeypatch):
    _, path = exported["tiny"]
    monkeypatch.setattr(exporters_runtime, "_dist_version", lambda name: None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(RuntimeMissingError, match=r'compressor\[cpu\]'):
        make_session(path)
    info = runtime_info()
    assert info["onnxruntime_version"] is None and info["packages"] == {}


def test_runtime_info_reads_the_installed_runtime():
    info = runtime_info()
    assert info["onnxruntime_version"] == ort.__version__
    assert "CPUExecutionProvider" in info["available_providers"]
    assert info["packages"] and not info["conflict"]


def test_exporters_never_imports_compressor():
    package = Path(exporters.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "compressor" for n in names), f"{source.name} imports compressor"


def test_parity_tolerance_grows_with_the_size_of_the_outputs() -> None:
    from exporters.onnx import ParityReport

    small = ParityReport(1.4e-4, 1.0, 10, 1e-4, ("CPUExecutionProvider",), scale=1.0, rtol=1e-5)
    large = ParityReport(1.4e-4, 1.0, 10, 1e-4, ("CPUExecutionProvider",), scale=15.0, rtol=1e-5)
    assert not small.ok and large.ok and large.tolerance == pytest.approx(2.5e-4)
    assert not ParityReport(1e-6, 0.99, 10, 1e-4, ("CPUExecutionProvider",), scale=15.0, rtol=1e-5).ok
    assert large.to_dict()["scale"] == 15.0 and large.to_dict()["ok"]
