"""Closed-form reconstruction after channel removal (compressor.reconstruct): the maths, the channel map it relies
on, and the stage in a compression run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compressor import cli, compress
from compressor.methods.base import Budget, MethodContext
from compressor.methods.baselines import L1
from compressor.models import create_model
from compressor.pruning import engine
from compressor.reconstruct import patches, reconstruct, ridge_fit

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NORMALIZE = "0.5,0.5,0.5/0.5,0.5,0.5"


def test_ridge_fit_solves_least_squares_and_shrinks_with_the_penalty() -> None:
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(200, 6, generator=g), torch.randn(6, 3, generator=g)
    y = a @ w + 0.01 * torch.randn(200, 3, generator=g)
    plain = ridge_fit(a, y, ridge=0.0)
    residual = y.double() - a.double() @ plain
    assert torch.allclose(a.double().T @ residual, torch.zeros(6, 3, dtype=torch.float64), atol=1e-8)
    assert torch.linalg.norm(ridge_fit(a, y, ridge=10.0)) < torch.linalg.norm(plain)


def test_patches_are_the_im2col_rows_a_conv_multiplies() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 3, 9, 9)
    columns = torch.tensor([0, 7, 24])
    rows = patches(x, conv, columns)
    out = conv(x).flatten(2)[:, :, columns].permute(0, 2, 1).reshape(-1, 4)
    assert torch.allclose(rows @ conv.weight.reshape(4, -1).T, out, atol=1e-5)


def _two_convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 6, 3, padding=1, bias=True))


def _prune_first(model: nn.Module, drop: list[int]) -> tuple[nn.Module, dict]:
    example = torch.zeros(1, 3, 8, 8)
    pruned = copy.deepcopy(model)
    graph = engine.build_graph(pruned, example)
    groups = [g for g in engine.discover_groups(pruned, graph) if g.root == "0"]
    scores = {"0": torch.tensor([0.0 if c in drop else 1.0 for c in range(8)])}
    channels: dict = {}
    engine.apply_keep(pruned, graph, groups, scores, {"0": 8 - len(drop)}, channels=channels)
    return pruned, channels


def test_removed_channels_that_are_combinations_of_kept_ones_are_reconstructed_exactly() -> None:
    torch.manual_seed(0)
    model = _two_convs().eval()
    with torch.no_grad():  # channel 3 = channel 0 + 2 x channel 1, channel 5 = -channel 2: both redundant
        model[0].weight[3] = model[0].weight[0] + 2 * model[0].weight[1]
        model[0].weight[5] = -model[0].weight[2]
    pruned, channels = _prune_first(model, [3, 5])
    batches = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    section = reconstruct(model, pruned, channels, batches, positions=64, ridge=0.0)
    fit = {row["layer"]: row for row in section["layers"]}["1"]
    assert fit["error_before"] > 0.05 and fit["error_after"] < 1e-5
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(pruned(x), model(x), atol=1e-4)


def test_reconstruction_reduces_the_consuming_layers_output_error_on_calibration_data() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)).eval()
    pruned, channels = _prune_first(model, [1, 4, 6])
    batches = [torch.randn(32, 3, 8, 8) for _ in range(2)]
    held_out = torch.randn(32, 3, 8, 8)

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.linalg.norm(m[:4](held_out) - model[:4](held_out)))

    before = error(pruned)
    section = reconstruct(model, pruned, channels, batches, positions=64, ridge=1e-3)
    assert [r["layer"] for r in section["layers"]] == ["3"]
    assert section["layers"][0]["error_after"] < section["layers"][0]["error_before"]
    assert error(pruned) < before  # also on images it was not fitted on


def test_the_channel_map_names_the_original_channels_each_pruned_layer_kept() -> None:
    model = create_model("samplenet").eval()
    example = torch.zeros(1, 3, 32, 32)
    ctx = MethodContext(example=example, num_classes=10, device=torch.device("cpu"), seed=0,
                        budget=Budget(0.4, "filters", 1), original=model)
    result = L1().apply(model, ctx)
    assert result.channels, "a pruning method returns which channels each layer kept"
    before, after = dict(model.named_modules()), dict(result.model.named_modules())
    checked = 0
    for name, kept in result.channels.items():
        w0, w1 = before[name].weight, after[name].weight
        sliced = w0[list(kept["out"])]
        if not (isinstance(before[name], nn.Conv2d) and before[name].groups > 1):
            sliced = sliced[:, list(kept["in"])]
        assert torch.equal(sliced, w1), name
        checked += 1
    assert checked >= 8  # the concat consumer, the residual streams and the depthwise convs included


def test_compress_reconstructs_by_default_and_reports_each_layer(tmp_path: Path) -> None:
    common = dict(arch="samplenet", data=str(SAMPLES / "shapes_train_set.npz"),
                  eval_data=str(SAMPLES / "shapes_test_set.npz"), normalize=NORMALIZE, method="l1", target=0.4,
                  round_to=1, epochs=0, bn_recalib=256, quantize="none", bench_batches=(), calib_samples=128)
    on = compress(str(SAMPLES / "samplenet.pt"), out=tmp_path / "on", **common).report
    off = compress(str(SAMPLES / "samplenet.pt"), reconstruct=False, out=None, **common).report
    section = on["reconstruction"]
    assert section["refitted"] >= 3 and all(r["error_after"] <= r["error_before"] for r in section["layers"])
    assert off["reconstruction"] == {"skipped": "--no-reconstruct"}
    assert on["compressed"]["params"] == off["compressed"]["params"]
    # the refit layers reproduce the original pre-BN outputs: the original BN statistics are kept
    assert on["compressed"]["accuracy_before_bn_recalib"] is None and "bn_recalib_images" not in on["method"]
    assert off["method"]["bn_recalib_images"] == 256
    assert on["compressed"]["accuracy"] > off["compressed"]["accuracy"]
    saved = json.loads((tmp_path / "on" / "report.json").read_text())
    assert saved["reconstruction"]["layers"] == section["layers"]


def test_reconstruction_without_calibration_data_is_skipped_and_says_why() -> None:
    report = compress(str(SAMPLES / "samplenet.pt"), arch="samplenet", method="l1", target=0.3, round_to=1,
                      bench_batches=(), out=None).report
    assert report["reconstruction"] == {"skipped": "no --data to calibrate on"}


@pytest.mark.parametrize("flag", ["--no-reconstruct", "--reconstruct"])
def test_the_reconstruct_flag_reaches_the_api(flag: str, api_calls, tmp_path: Path) -> None:
    assert CliRunner().invoke(cli.app, [str(tmp_path / "m.pt"), flag]).exit_code == 0
    assert [c["reconstruct"] for c in api_calls] == [flag == "--reconstruct"]
