"""compress inspect: layers, coupled channel groups and totals, through the CLI runner and the Python function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor.commands import bench, inspect
from compressor.commands.common import make_app
from compressor.errors import InputError, UnknownNameError
from compressor.inspect import ModelSummary, inspect_checkpoint, inspect_model, render_summary
from compressor.io import load_model
from compressor.metrics import count_filters, count_macs, count_params, layer_macs
from compressor.models import create_model

from .conftest import SAMPLES

SAMPLENET = SAMPLES / "samplenet.pt"
runner = CliRunner()
app = make_app()
inspect.register(app)
bench.register(app)


def invoke(*args: object):
    return runner.invoke(app, ["inspect", *(str(a) for a in args)])


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10)


@pytest.fixture(scope="module")
def resnet20_summary(resnet20: torch.nn.Module) -> ModelSummary:
    return inspect_model(resnet20, torch.zeros(1, 3, 32, 32))


def test_resnet20_groups_couple_the_residual_stream(resnet20_summary: ModelSummary) -> None:
    groups = {g.root: g for g in resnet20_summary.groups}
    stream = groups["conv1"]  # stage 1: the stem and every block's conv2 add into one stream
    assert set(stream.out_layers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert set(stream.in_layers) == {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"}
    assert stream.channels == 16
    stage3 = next(g for g in resnet20_summary.groups if "layer3.1.conv2" in g.out_layers)
    assert set(stage3.out_layers) == {"layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"}
    assert "linear" in stage3.in_layers and stage3.channels == 64
    inner = groups["layer2.1.conv1"]  # a block's inner conv is a group of its own
    assert (inner.out_layers, inner.in_layers, inner.channels) == (("layer2.1.conv1",), ("layer2.1.conv2",), 32)
    assert len(resnet20_summary.groups) == 3 + 9  # three streams, nine inner convs


def test_resnet20_layers_and_totals_equal_metrics(resnet20: torch.nn.Module,
                                                  resnet20_summary: ModelSummary) -> None:
    example = torch.zeros(1, 3, 32, 32)
    totals = resnet20_summary.totals
    assert totals.params == count_params(resnet20) == 269_722
    assert totals.macs == count_macs(resnet20, example)
    assert totals.filters == count_filters(resnet20)
    assert totals.layers == 20 and totals.groups == 12
    assert totals.prunable_channels == sum(g.channels for g in resnet20_summary.groups)
    layers = {layer.name: layer for layer in resnet20_summary.layers}
    assert {name: layer.macs for name, layer in layers.items()} == layer_macs(resnet20, example)
    down = layers["layer3.0.conv1"]
    assert (down.type, down.in_channels, down.out_channels, down.kernel, down.stride, down.groups, down.params) == \
        ("Conv2d", 32, 64, (3, 3), (2, 2), 1, 18_432)
    assert down.macs == 18_432 * 8 * 8 and down.group == "layer3.0.conv1"
    head = layers["linear"]
    assert (head.kernel, head.stride, head.params, head.macs, head.group) == (None, None, 650, 640, None)
    assert layers["layer1.1.conv2"].group == "conv1"
    assert resnet20_summary.input_shape == (3, 32, 32)


def test_inspect_leaves_the_model_as_it_was() -> None:
    model = create_model("resnet20")
    model.train()
    model.layer2.eval()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inspect_model(model, torch.zeros(1, 3, 32, 32))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_ignore_drops_the_group_of_the_layer(resnet20: torch.nn.Module) -> None:
    summary = inspect_model(resnet20, torch.zeros(1, 3, 32, 32), ignore=["layer1.0.conv2"])
    assert "conv1" not in {g.root for g in summary.groups} and summary.totals.groups == 11
    assert {layer.name: layer.group for layer in summary.layers}["layer1.2.conv2"] is None
    assert summary.ignored == ("layer1.0.conv2",)
    with pytest.raises(InputError, match="not a layer of the model"):
        inspect_model(resnet20, torch.zeros(1, 3, 32, 32), ignore=["layer9.conv"])


def test_to_dict_is_json_and_render_prints_tables(resnet20_summary: ModelSummary) -> None:
    data = json.loads(json.dumps(resnet20_summary.to_dict()))
    assert data["groups"][0]["out_layers"] == list(resnet20_summary.groups[0].out_layers)
    assert data["layers"][0]["kernel"] == [3, 3] and data["input_shape"] == [3, 32, 32]
    from rich.console import Console

    console = Console(record=True, width=120)
    render_summary(resnet20_summary, console=console)
    text = console.export_text()
    assert "layer3.2.conv2" in text and "269,722" in text and "prunable channel groups" in text


def test_cli_table_on_samplenet() -> None:
    result = invoke(SAMPLENET, "--arch", "samplenet")
    assert result.exit_code == 0, result.output
    for needle in ("res2.conv2", "dw.0", "prunable channel groups", "23,098", "totals"):
        assert needle in result.stdout


def test_cli_json_on_samplenet_equals_metrics() -> None:
    result = invoke(SAMPLENET, "--json")  # the checkpoint records its arch
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = load_model(SAMPLENET).model
    example = torch.zeros(1, 3, 32, 32)
    assert data["totals"]["params"] == count_params(model) == 23_098
    assert data["totals"]["macs"] == count_macs(model, example)
    assert data["totals"]["filters"] == count_filters(model)
    assert data["arch"] == "samplenet" and data["source"] == str(SAMPLENET)
    dw = next(layer for layer in data["layers"] if layer["name"] == "dw.0")
    assert dw["groups"] == dw["in_channels"] == 32  # depthwise
    coupled = next(g for g in data["groups"] if g["root"] == "dw.0")  # a depthwise conv prunes with its producers
    assert set(coupled["out_layers"]) == {"dw.0", "branch_a.0", "branch_b.0"}


def test_cli_resnet20_state_dict_with_ignore(tmp_path: Path, resnet20: torch.nn.Module) -> None:
    path = tmp_path / "r20.th"
    torch.save({"state_dict": resnet20.state_dict()}, path)
    result = invoke(path, "--arch", "resnet20", "--ignore-layer", "conv1", "--ignore-layer", "layer3.0.conv1",
                    "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ignored"] == ["conv1", "layer3.0.conv1"]
    roots = {g["root"] for g in data["groups"]}
    assert "conv1" not in roots and "layer3.0.conv1" not in roots and len(roots) == 10


def test_cli_pickled_module_needs_an_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(create_model("samplenet"), path)
    assert_one_line_error(invoke(path, "--trust-pickle"), 2, "input shape", "--input-shape")
    result = invoke(path, "--trust-pickle", "--input-shape", "3,32,32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["params"] == 23_098


@pytest.mark.parametrize(("args", "needle"), [
    (("--arch", "resnet21"), "unknown architecture 'resnet21'"),
    (("--input-shape", "3,x"), "--input-shape expects"),
    (("--input-shape", "3,0,32"), ">= 1"),
    (("--ignore-layer", "nope"), "not a layer"),
    (("--input-shape", "1,32,32"), "does not run on a 1x32x32 input"),
])
def test_cli_bad_input_is_one_line_exit_2(args: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(invoke(SAMPLENET, *args), 2, needle)


def test_cli_missing_file_is_one_line_exit_2(tmp_path: Path) -> None:
    assert_one_line_error(invoke(tmp_path / "missing.pt", "--arch", "resnet20"), 2, "not found")


def test_cli_debug_reraises() -> None:
    result = invoke(SAMPLENET, "--arch", "resnet21", "--debug")
    assert result.exit_code != 0 and isinstance(result.exception, UnknownNameError)


def test_inspect_checkpoint_explicit_shape_overrides() -> None:
    summary = inspect_checkpoint(SAMPLENET, input_shape=(3, 16, 16))
    assert summary.input_shape == (3, 16, 16)
    assert summary.totals.macs == count_macs(load_model(SAMPLENET).model, torch.zeros(1, 3, 16, 16))
