"""compress slt: strong lottery tickets in a partially frozen random network (compressor.slt, compressor.slt_run)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compressor import slt, slt_ticket
from compressor.cli import main as cli_main
from compressor.data import ImageDataset, make_loader
from compressor.errors import InputError
from compressor.slt import LOCKED, PRUNED, SEARCHED, SLTConfig
from compressor.training import TrainConfig, Trainer


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def tiny_data(n: int = 32, size: int = 8, classes: int = 4, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                        torch.arange(n) % classes)


@pytest.mark.parametrize("freeze,share", [(0.7, None), (0.6, 0.3), (0.5, 1.0), (0.0, None)])
def test_frozen_pattern_is_exactly_the_requested_fractions_per_layer(freeze: float, share: float | None) -> None:
    keep = 0.2 if share == 1.0 else 0.5
    cfg = SLTConfig(keep=keep, freeze=freeze, freeze_prune=share)
    net = slt.make_slt(tiny(), cfg)
    layers = slt.slt_layers(net)
    assert len(layers) == 3
    for (_, layer), plan in zip(layers, slt.plans_of(net)):
        n = layer.weight.numel()
        p = share if share is not None else 1 - keep
        assert int((layer.pattern == PRUNED).sum()) == round(n * freeze * p)
        assert int((layer.pattern == LOCKED).sum()) == round(n * freeze * (1 - p))
        assert int((layer.pattern == SEARCHED).sum()) == plan.searched
        assert int(layer.mask().sum()) == round(n * keep)  # the ticket keeps exactly --keep of every layer


def test_erk_distributes_the_keep_ratio_over_layers_and_keeps_the_total() -> None:
    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (4, 16), (64, 64, 3, 3)]
    dens = slt.erk_densities(shapes, 0.3)
    total = sum(d * math.prod(s) for d, s in zip(dens, shapes))
    assert total == pytest.approx(0.3 * sum(math.prod(s) for s in shapes))
    assert max(dens) <= 1.0 and dens[3] < dens[1]  # the big layer is sparser than the small ones
    net = slt.make_slt(tiny(), SLTConfig(keep=0.5, freeze=0.5, distribution="erk"))
    kept = sum(p.kept for p in slt.plans_of(net))
    assert abs(kept - 0.5 * sum(p.numel for p in slt.plans_of(net))) <= 3  # rounding per layer only


def test_locked_weights_are_always_in_and_pruned_ones_never() -> None:
    net = slt.make_slt(tiny(), SLTConfig(keep=0.5, freeze=0.6, freeze_prune=0.5))
    for _, layer in slt.slt_layers(net):
        with torch.no_grad():  # the most adversarial scores: pruned ones huge, locked ones zero, searched random
            layer.scores.copy_(torch.where(layer.pattern == PRUNED, 1e6, torch.where(layer.pattern == LOCKED, 0.0,
                                                                                     layer.scores)))
        mask = layer.mask()
        assert bool((mask[layer.pattern == LOCKED] == 1).all())
        assert bool((mask[layer.pattern == PRUNED] == 0).all())
        assert int(mask[layer.pattern == SEARCHED].sum()) == layer.topk


def test_frozen_scores_get_no_gradient_and_weights_never_train() -> None:
    torch.manual_seed(0)
    net = slt.make_slt(tiny(), SLTConfig(keep=0.5, freeze=0.7))
    assert [n for n, p in net.named_parameters()] == ["0.scores", "3.scores", "8.scores"]  # no weight, no BN affine
    net(torch.randn(4, 3, 8, 8)).logsumexp(1).sum().backward()
    for _, layer in slt.slt_layers(net):
        assert layer.scores.grad is not None
        assert bool((layer.scores.grad[layer.pattern != SEARCHED] == 0).all())
        assert float(layer.scores.grad[layer.pattern == SEARCHED].abs().sum()) > 0
    net.zero_grad()
    weights = {n: m.weight.clone() for n, m in slt.slt_layers(net)}
    scores = {n: m.scores.detach().clone() for n, m in slt.slt_layers(net)}
    loader = make_loader(tiny_data(), batch_size=8, normalize=None, shuffle=True)
    Trainer(TrainConfig(epochs=2, lr=0.5, weight_decay=1e-3), device="cpu", progress=False).fit(net, loader)
    moved = 0
    for name, layer in slt.slt_layers(net):
        assert torch.equal(layer.weight, weights[name])
        frozen = layer.pattern != SEARCHED
        assert bool((layer.scores.detach()[frozen] == 0).all())
        moved += int((layer.scores.detach()[~frozen] != scores[name][~frozen]).sum())
    assert moved > 0  # the searched scores did train


def test_same_seeds_give_the_same_network_and_other_seeds_do_not() -> None:
    cfg = SLTConfig(keep=0.5, freeze=0.5, init="kaiming-normal")
    a, b = slt.make_slt(tiny(), cfg), slt.make_slt(nn.Sequential(*tiny()), cfg)
    other_freeze = slt.make_slt(tiny(), SLTConfig(keep=0.5, freeze=0.5, init="kaiming-normal", freeze_seed=7))
    other_weights = slt.make_slt(tiny(), SLTConfig(keep=0.5, freeze=0.5, init="kaiming-normal", weight_seed=7))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a.eval()(x), b.eval()(x))
    for (_, la), (_, lb), (_, lf), (_, lw) in zip(*(slt.slt_layers(m) for m in (a, b, other_freeze, other_weights))):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.pattern, lb.pattern)
        assert torch.equal(la.weight, lf.weight) and not torch.equal(la.pattern, lf.pattern)
        assert torch.equal(la.pattern, lw.pattern) and not torch.equal(la.weight, lw.weight)


def test_signed_constant_init_is_scaled_by_the_layer_keep_ratio() -> None:
    net = slt.make_slt(tiny(), SLTConfig(keep=0.25))
    conv = slt.slt_layers(net)[1][1]
    std = math.sqrt(2.0) / math.sqrt(8 * 9 * 0.25)
    assert torch.allclose(conv.weight.abs(), torch.full_like(conv.weight, std))
    unscaled = slt.slt_layers(slt.make_slt(tiny(), SLTConfig(keep=0.25, scale_fan=False)))[1][1]
    assert float(unscaled.weight.abs().max()) == pytest.approx(std * 0.5)


@pytest.mark.parametrize("freeze,share", [(0.7, None), (0.5, 0.2)])
def test_artefact_size_matches_the_formula_and_reloads_bit_identically(tmp_path, freeze: float,
                                                                      share: float | None) -> None:
    keep = 0.5
    net = slt.make_slt(tiny(), SLTConfig(keep=keep, freeze=freeze, freeze_prune=share))
    net.train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm statistics that are not the defaults
            net(torch.randn(8, 3, 8, 8))
    net.eval()
    path = slt_ticket.save_ticket(net, tmp_path / "t.slt", arch="tiny")
    payload = torch.load(path, weights_only=True)
    p = share if share is not None else 1 - keep
    expected = sum(n - round(n * freeze * p) - round(n * freeze * (1 - p)) for n in (8 * 27, 16 * 72, 4 * 16))
    assert payload["n_bits"] == expected
    assert payload["mask_bits"].dtype == torch.uint8 and payload["mask_bits"].numel() == math.ceil(expected / 8)
    assert sum(t.numel() for s in payload["bn"].values() for t in s.values()) == 2 * (8 + 16)  # the only floats
    size = slt_ticket.size_bits(net)
    assert size["mask_bits"] == expected
    assert size["total_bits"] == expected + 2 * 64 + 32 * 2 * (8 + 16)
    assert size["dense_source_mask_bits"] == 8 * 27 + 16 * 72 + 4 * 16
    rebuilt = slt.load_slt(path, base=tiny())
    x = torch.randn(16, 3, 8, 8)
    assert torch.equal(rebuilt(x), slt.materialize(net)(x))
    assert torch.equal(rebuilt(x), net(x))


def test_bad_configs_are_one_line_input_errors() -> None:
    for kw in ({"keep": 1.0}, {"keep": -0.1}, {"freeze": 1.0}, {"freeze": -0.5}, {"freeze_prune": 1.5},
               {"init": "xavier"}, {"distribution": "normal"},
               {"keep": 0.1, "freeze": 0.8, "freeze_prune": 0.0},  # 0.8 locked in > keep 0.1
               {"keep": 0.5, "freeze": 0.7, "freeze_prune": 1.0}):  # only 0.3 left > keep 0.5 impossible
        with pytest.raises(InputError) as info:
            SLTConfig(**kw)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)


def test_unsupported_layers_are_refused() -> None:
    with pytest.raises(InputError, match="LayerNorm"):
        slt.make_slt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), SLTConfig())


ARGS = ["slt", "--arch", "samplenet", "--epochs", "1", "--bench-batch", "none", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("extra,needle", [
    (["--keep", "1.5"], "--keep"),
    (["--freeze", "1"], "--freeze"),
    (["--keep", "0.5", "--freeze", "0.7", "--freeze-prune", "1"], "incompatible"),
    (["--init", "uniform"], "--init"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, extra: list[str], needle: str) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((8, 32, 32, 3), np.uint8), y=np.arange(8) % 4)
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), [*ARGS, "--data", str(data), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not out.exists()


def _app():  # the subcommand app, as ``compress slt ...`` dispatches to it
    from compressor.cli import tools

    return tools


def test_cli_run_writes_a_ticket_that_reloads_bit_identically(tmp_path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), y=np.arange(48) % 4)
    out = tmp_path / "run"
    result = CliRunner().invoke(_app(), [*ARGS, "--data", str(data), "--eval-images", "16", "--bn-recalib", "16",
                                         "--keep", "0.5", "--freeze", "0.7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "report.md", "ticket.slt"]
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "slt-frozen" and report["reload"]["bit_identical"]
    assert report["size"]["mask_reduction_vs_dense_source"] == pytest.approx(1 / 0.3, rel=0.01)
    assert report["onnx"]["parity"]["ok"]
    rebuilt = slt.load_slt(out / "ticket.slt")
    import onnxruntime as ort

    x = torch.randn(4, 3, 32, 32)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(rebuilt(x).detach().numpy(), onnx_out, atol=1e-4)
    assert cli_main is not None
