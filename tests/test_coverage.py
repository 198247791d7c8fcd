"""Issue 17: the structures of common CNNs compress with parity or are skipped with a reason, never a crash.

The reproduction models are in ``tests/zoo_models.py`` (no torchvision needed): grouped convolutions (ResNeXt),
channel shuffle (ShuffleNetV2), layer scale with channels-last LayerNorm (ConvNeXt), SiLU squeeze-excitation
(EfficientNet) and a grayscale LeNet that flattens with ``x.view(-1, 4*4*50)``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compressor import cli, compress
from compressor.data import load_dataset, make_loader
from compressor.errors import PruningError
from compressor.pruning import engine
from exporters import ParityReport
from exporters.errors import ParityError
from tests import zoo_models

RGB = ("resnext_block", "shuffle_unit", "convnext_block", "se_silu")


def _npz(path: Path, shape: tuple[int, ...], *, dtype: str = "uint8", n: int = 32) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    np.savez(path, x=x if dtype == "uint8" else (x / 255.0).astype(np.float32), y=rng.integers(0, 10, n))
    return path


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _npz(tmp_path_factory.mktemp("data") / "rgb.npz", (32, 32, 3))


@pytest.fixture(scope="module")
def gray(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _npz(tmp_path_factory.mktemp("data") / "gray.npz", (28, 28, 1))


def _compress(name: str, method: str, data: Path):
    torch.manual_seed(0)
    return compress(getattr(zoo_models, name)(), data=str(data), eval_data=str(data), method=method, target=0.33,
                    epochs=0, bench_batches=(), bn_recalib=0, calib_samples=32, round_to=1, quantize="none",
                    reconstruct=False)  # INT8 and the refit are covered elsewhere; here: pruning, export, parity


@pytest.mark.parametrize("method", ["l1", "cmi"])
@pytest.mark.parametrize("name", RGB)
def test_structure_compresses_with_parity(name: str, method: str, rgb: Path) -> None:
    report = _compress(name, method, rgb).report
    assert report["parity"]["ok"], report["parity"]
    assert abs(report["method"]["achieved"] - 0.33) <= 0.02
    rows = report["method"]["groups"]
    assert any(row["keep"] < row["channels"] for row in rows)
    skipped = _skipped(report)
    if name == "shuffle_unit":  # the stream through the shuffle cannot be mapped; the branches are pruned
        assert skipped and all("reshape of the channel dimension" in s["reason"] for s in skipped)
    else:
        assert skipped == []
    if name == "resnext_block":  # grouped convs: whole positions per block (4 groups)
        grouped = [row for row in rows if row.get("blocks") == 4]
        assert grouped and all(row["keep"] % 4 == 0 for row in grouped)
        assert any(row["keep"] < row["channels"] for row in grouped)


def _skipped(report: dict) -> list[dict]:
    return report["method"]["skipped"]


@pytest.mark.parametrize("method", ["l1", "cmi"])
def test_lenet_view_flatten_group_is_skipped_and_reachable_target_named(method: str, gray: Path) -> None:
    """Pruning conv2 breaks the hard-coded ``view(-1, 800)``: found by validation, skipped, named in the error
    with the most that can be removed without it (conv1's 18 of 70 filters = 0.257)."""
    with pytest.raises(PruningError, match=r"at most 0\.257 .*'conv2': pruning it breaks the model") as info:
        _compress("lenet_gray", method, gray)
    assert "--ignore-layer" not in str(info.value)


def test_lenet_compresses_at_a_reachable_target(gray: Path) -> None:
    torch.manual_seed(0)
    report = compress(zoo_models.lenet_gray(), data=str(gray), eval_data=str(gray), method="l1", target=0.25,
                      epochs=0, bench_batches=(), bn_recalib=0, round_to=1).report
    assert report["parity"]["ok"]
    assert [s["root"] for s in _skipped(report)] == ["conv2"]


def test_cli_lenet_unreachable_is_one_line_exit_2(tmp_path: Path, gray: Path) -> None:
    model = tmp_path / "lenet.pt"
    torch.save(zoo_models.lenet_gray().state_dict(), model)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, [str(model), "--arch", "tests.zoo_models:lenet_gray", "--data", str(gray),
                                          "--method", "l1", "--epochs", "0", "--bench-batch", "none",
                                          "--bn-recalib", "0", "--round-to", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "not reachable" in result.stderr and "conv2" in result.stderr
    assert not out.exists()


def _dead(channels: list[int], *layers: nn.Module) -> None:
    """Zero ``channels`` of each conv's filters and each BN's affine terms: with ReLU in between, they are exactly
    zero all the way to their consumers, so removing them must not change the output."""
    with torch.no_grad():
        for layer in layers:
            layer.weight[channels] = 0.0
            if layer.bias is not None:
                layer.bias[channels] = 0.0


def _prune_dead(model: nn.Module, root: str, channels: list[int]) -> nn.Module:
    example = torch.randn(2, 3, 32, 32)
    pruned = copy.deepcopy(model)
    graph = engine.build_graph(pruned, example)
    group = next(g for g in engine.discover_groups(pruned, graph) if g.root == root)
    scores = torch.ones(group.channels)
    scores[channels] = 0.0
    engine.apply_keep(pruned, graph, [group], {root: scores}, {root: group.channels - len(channels)})
    return pruned


def test_grouped_conv_pruning_removes_the_same_positions_in_every_block() -> None:
    torch.manual_seed(0)
    model = zoo_models.resnext_block().eval()
    dead = [1, 9, 17, 25]  # position 1 of each of the 4 blocks of 8 channels
    _dead(dead, model.block1.conv1, model.block1.bn1)
    pruned = _prune_dead(model, "block1.conv1", dead)
    assert pruned.block1.conv2.in_channels == 28 and pruned.block1.conv2.weight.shape[1] == 7
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


def test_shuffle_unit_branch_pruning_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = zoo_models.shuffle_unit().eval()
    branch = model.units[0].branch
    _dead([0, 5], branch[0], branch[1], branch[3], branch[4])
    pruned = _prune_dead(model, "units.0.branch.3", [0, 5])  # branch.0 -> dw conv branch.3 -> branch.5
    assert pruned.units[0].branch[3].out_channels == 6
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


@pytest.mark.parametrize("shape,dtype", [((28, 28, 1), "uint8"), ((32, 32, 3), "uint8"), ((1, 28, 28), "float")])
def test_batches_are_standard_nchw_whatever_the_file_layout(shape: tuple[int, ...], dtype: str,
                                                            tmp_path: Path) -> None:
    dataset = load_dataset(str(_npz(tmp_path / "d.npz", shape, dtype=dtype, n=8)))
    x, _ = next(iter(make_loader(dataset, batch_size=4, normalize=None)))
    n, c, h, w = x.shape
    assert x.stride() == (c * h * w, h * w, w, 1)
    if c == 1:  # a LeNet that flattens with .view runs on them
        assert zoo_models.lenet_gray()(x).shape == (4, 10)


def test_parity_failure_prints_per_output_abs_and_relative_diff_and_top1() -> None:
    outputs = ({"name": "logits", "max_abs_diff": 0.5, "scale": 10.0, "rel_diff": 0.05},
               {"name": "aux", "max_abs_diff": 1e-6, "scale": 2.0, "rel_diff": 5e-7})
    report = ParityReport(0.5, 0.75, 8, 1e-4, ("CPUExecutionProvider",), 10.0, 1e-4, outputs)
    assert not report.ok
    with pytest.raises(ParityError) as info:
        report.raise_if_failed()
    text = str(info.value)
    assert "logits: max abs diff 0.5, relative 0.05" in text and "aux: max abs diff 1e-06, relative 5e-07" in text
    assert "top-1 agreement 75.00%" in text
    assert report.to_dict()["outputs"][0]["rel_diff"] == 0.05
