"""Issue 17 item 4: ``--arch torchvision:NAME`` / ``--arch timm:NAME`` with ``--arch-kwargs``.

The error paths (package missing or broken, bad ``--arch-kwargs``) run everywhere; the tests that build real
torchvision/timm models skip with a message when the package cannot be imported (:mod:`tests.hub_imports`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compressor import cli, load_compressed
from compressor.errors import InputError
from compressor.io import load_model, resolve_arch
from compressor.models import hub
from compressor.models.hub import parse_kwargs
from tests.hub_imports import require

RUNNER = CliRunner()


def _invoke(args: list[str]):
    return RUNNER.invoke(cli.app, [str(a) for a in args])


def _one_line_exit_2(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len([line for line in err.splitlines() if line.strip(" │╭╰─╮╯Error")]) >= 1
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, flat
    return flat


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1)}, path)
    return path


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("hub") / "noise.npz"
    np.savez(path, x=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y=np.arange(24) % 10)
    return path


# ------------------------------------------------------------------------------------------------ --arch-kwargs
def test_arch_kwargs_are_typed() -> None:
    parsed = parse_kwargs("num_classes=10, drop_rate=0.1,aux_logits=False,eps=1e-3,norm=none,act_layer=gelu")
    assert parsed == {"num_classes": 10, "drop_rate": 0.1, "aux_logits": False, "eps": 1e-3, "norm": None,
                      "act_layer": "gelu"}
    assert type(parsed["num_classes"]) is int and type(parsed["drop_rate"]) is float
    assert parse_kwargs(None) == {} and parse_kwargs({"num_classes": 3}) == {"num_classes": 3}


@pytest.mark.parametrize("text, message", [("num_classes", "not KEY=VALUE"), ("num_classes=", "not KEY=VALUE"),
                                           ("1x=2", "not KEY=VALUE"), ("a=1,a=2", "a is given twice")])
def test_bad_arch_kwargs_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_kwargs(text)


def test_cli_bad_arch_kwargs_exit_2_nothing_written(tmp_path: Path, weights: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([weights, "--arch", "resnet20", "--arch-kwargs", "num_classes", "--out", out])
    _one_line_exit_2(result, "--arch-kwargs", "KEY=VALUE")
    assert not out.exists()


def test_builtin_arch_takes_num_classes_from_arch_kwargs_and_refuses_others() -> None:
    from compressor.io import _build

    model, _ = _build("resnet20", None, {"num_classes": 7})
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(InputError, match="does not take --arch-kwargs width"):
        _build("resnet20", None, {"width": 2})


# ---------------------------------------------------------------------------------------- package missing/broken
@pytest.mark.parametrize("hub_name", ["torchvision", "timm"])
def test_missing_package_is_one_line_exit_2_naming_the_install(hub_name: str, tmp_path: Path, weights: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as if the package were absent, whether or not it is installed
    monkeypatch.setitem(sys.modules, "torchvision.models" if hub_name == "torchvision" else "timm", None)
    out = tmp_path / "out"
    result = _invoke([weights, "--arch", f"{hub_name}:resnet18", "--out", out])
    _one_line_exit_2(result, f"needs {hub_name}, which is not installed", f"pip install {hub_name}")
    assert not out.exists()


def test_broken_package_is_one_line_naming_the_matching_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(hub.importlib, "import_module", broken)
    with pytest.raises(InputError, match="does not import with torch .* install the torchvision build that matches"):
        resolve_arch("torchvision:resnet18")
    with pytest.raises(InputError, match="timm imports torchvision, which is installed but does not import"):
        resolve_arch("timm:resnet18")


# -------------------------------------------------------------------------------------------------- torchvision
def test_unknown_torchvision_name_is_one_line_exit_2_with_close_matches(tmp_path: Path, weights: Path) -> None:
    require("torchvision")
    out = tmp_path / "out"
    result = _invoke([weights, "--arch", "torchvision:resnet19", "--out", out])
    _one_line_exit_2(result, "unknown torchvision model 'resnet19'", "Did you mean 'resnet18'")
    assert not out.exists()


def test_torchvision_weights_kwarg_is_refused() -> None:
    require("torchvision")
    factory, shape = resolve_arch("torchvision:resnet18")
    assert shape is None  # the input size comes from the data
    with pytest.raises(InputError, match="weights=.*random weights"):
        factory(weights="DEFAULT")


def test_torchvision_state_dict_loads_with_its_classifier_size(tmp_path: Path) -> None:
    """A 10-class fine-tuned resnet18 loads with only --arch: num_classes is read from the checkpoint."""
    torchvision = require("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = load_model(path, arch="torchvision:resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    kwargs = load_model(path, arch="torchvision:resnet18", arch_kwargs="num_classes=10,zero_init_residual=true")
    assert kwargs.arch_kwargs == {"num_classes": 10, "zero_init_residual": True}


def test_cli_torchvision_arch_with_kwargs_compresses_and_reloads(tmp_path: Path, noise: Path) -> None:
    """squeezenet1_1 has no Linear classifier: its 10 classes come from --arch-kwargs, which compressed.pt keeps."""
    torchvision = require("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=10, dropout=0.0).eval()
    path = tmp_path / "sq.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "out"
    result = _invoke([path, "--arch", "torchvision:squeezenet1_1", "--arch-kwargs", "num_classes=10,dropout=0.0",
                      "--data", noise, "--method", "l1", "--target", "0.33", "--round-to", "1", "--bench-batch",
                      "none", "--bn-recalib", "0", "--quantize", "none", "--no-reconstruct", "--calib-samples", "8",
                      "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    payload = torch.load(out / "compressed.pt", weights_only=True)
    assert payload["arch"] == "torchvision:squeezenet1_1"
    assert payload["arch_kwargs"] == {"num_classes": 10, "dropout": 0.0}
    rebuilt = load_compressed(out / "compressed.pt")
    assert rebuilt(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------- timm
def test_unknown_timm_name_is_one_line_exit_2(tmp_path: Path, weights: Path) -> None:
    require("timm")
    out = tmp_path / "out"
    result = _invoke([weights, "--arch", "timm:resnet19", "--out", out])
    _one_line_exit_2(result, "unknown timm model 'resnet19'", "timm.list_models")
    assert not out.exists()


def test_timm_arch_builds_with_typed_kwargs_and_loads_a_checkpoint(tmp_path: Path) -> None:
    timm = require("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, drop_rate=0.25).eval()
    path = tmp_path / "timm_r18.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="timm:resnet18", arch_kwargs="drop_rate=0.25")
    assert loaded.model.drop_rate == 0.25
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_cli_timm_arch_compresses_and_reloads(tmp_path: Path, noise: Path) -> None:
    """timm's tiny test_efficientnet (SiLU, squeeze-excitation), 10 classes read from the checkpoint."""
    timm = require("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    path = tmp_path / "eff.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "out"
    result = _invoke([path, "--arch", "timm:test_efficientnet", "--data", noise, "--method", "l1", "--target",
                      "0.33", "--round-to", "1", "--bench-batch", "none", "--bn-recalib", "0", "--quantize", "none",
                      "--no-reconstruct", "--calib-samples", "8", "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] and abs(report["method"]["achieved"] - 0.33) <= 0.02
    rebuilt = load_compressed(out / "compressed.pt")
    assert rebuilt(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
