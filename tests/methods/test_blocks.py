"""``--method blocks``: which blocks are droppable, the greedy ablation order, the target, replay, chains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.errors import PruningError
from compressor.methods import build_method
from compressor.methods.base import Budget, MethodContext, replay
from compressor.methods.blocks import ablation_harm, droppable_blocks
from compressor.methods.chain import remaining_target
from compressor.models import create_model


class Residual(nn.Module):
    def __init__(self, c: int, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.scale * self.conv(x))


class Net(nn.Module):
    """stem -> three residual blocks (the middle one's branch scaled to nothing) -> a plain conv -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(Residual(8), Residual(8, scale=1e-4), Residual(8))
        self.plain = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.plain(self.blocks(self.stem(x))))


def _ctx(model: nn.Module, target: float, **budget) -> MethodContext:
    torch.manual_seed(0)
    calib = [(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long))]
    return MethodContext(example=torch.zeros(1, 3, 16, 16), num_classes=10, device=torch.device("cpu"), seed=0,
                         budget=Budget(target, **budget), original=model, calib=calib)


def test_only_identity_shortcut_blocks_are_droppable() -> None:
    torch.manual_seed(0)
    assert droppable_blocks(Net().eval(), torch.randn(4, 3, 16, 16)) == ["blocks.0", "blocks.1", "blocks.2"]
    # CIFAR ResNet-20: 9 blocks, the first of stages 2 and 3 change the shape (option-A shortcut)
    names = droppable_blocks(create_model("resnet20").eval(), torch.randn(2, 3, 32, 32))
    assert len(names) == 7 and "layer2.0" not in names and "layer3.0" not in names and "layer1.0" in names


def test_ablation_harm_is_zero_for_equal_logits_and_grows_with_the_change() -> None:
    ref = [torch.randn(8, 10)]
    assert ablation_harm(ref, ref) == pytest.approx(0.0, abs=1e-7)
    assert 0 < ablation_harm(ref, [ref[0] + 0.1 * torch.randn(8, 10)]) < ablation_harm(ref, [torch.randn(8, 10)])


def test_greedy_drops_the_harmless_block_first_and_meets_the_target() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    method = build_method("blocks")
    one_block = 8 / 48  # filters: stem 8 + 3 blocks x 8 + plain 8 + (linear not counted) = 40 conv filters
    result = method.apply(model, _ctx(model, 0.1))
    assert result.report["dropped"] == ["blocks.1"]  # its branch is scaled by 1e-4: dropping it changes nothing
    assert result.report["steps"][0]["harm_kl"] < 1e-6
    assert result.report["achieved"] >= 0.1 and result.report["achieved"] < 0.1 + one_block + 0.05
    assert isinstance(result.model.blocks[1], nn.Identity) and not isinstance(model.blocks[1], nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(result.model(x), model(x), atol=1e-3, rtol=1e-3)
    rebuilt = replay(Net(), result.records, torch.zeros(1, 3, 16, 16))
    assert isinstance(rebuilt.blocks[1], nn.Identity)


def test_ignored_and_unreachable_and_no_blocks_are_one_line_errors() -> None:
    model = Net().eval()
    with pytest.raises(PruningError, match="not reachable by removing blocks"):
        build_method("blocks").apply(model, _ctx(model, 0.7))
    result = build_method("blocks").apply(model, _ctx(model, 0.1, ignore_layers=("blocks.1",)))
    assert "blocks.1" not in result.report["dropped"] and result.report["ignored"] == ["blocks.1"]
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    plain(torch.zeros(1, 3, 16, 16))
    with pytest.raises(PruningError, match="no residual block"):
        build_method("blocks").apply(plain, _ctx(plain, 0.1))
    with pytest.raises(PruningError, match="--blocks-max-harm"):
        build_method("blocks", {"blocks_max_harm": 0.0}).apply(model, _ctx(model, 0.3))


def test_remaining_target() -> None:
    assert remaining_target(0.5, 100, 80) == pytest.approx(1 - 50 / 80)
    assert remaining_target(0.2, 100, 70) < 0
