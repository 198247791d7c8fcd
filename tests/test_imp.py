"""``--method imp``: the round schedule, global magnitude masks, masks kept through training / replay / export,
rewinding, and bad input."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from compressor import cli, compress, load_compressed, pipeline
from compressor.config import CompressConfig
from compressor.methods import build_method
from compressor.methods.base import Budget, MethodContext
from compressor.methods.imp import RecordEpochs, cumulative_target, round_fraction, step_target
from compressor.methods.masks import MASK, MaskKeeper, apply_masks, global_magnitude_masks, sparsity
from compressor.models import create_model, reinitialise
from compressor.training import TrainConfig, Trainer


def _batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return create_model("samplenet").eval()


def _ctx(model: nn.Module, target: float, train=None) -> MethodContext:
    return MethodContext(example=torch.zeros(1, 3, 32, 32), num_classes=10, device=torch.device("cpu"), seed=0,
                         budget=Budget(target), original=model, train=train,
                         train_config=TrainConfig(epochs=0, lr=0.05))


# ------------------------------------------------------------------------------------------------ the schedule
@pytest.mark.parametrize(("target", "rounds"), [(0.8, 1), (0.8, 3), (0.33, 2), (0.9, 10)])
def test_rounds_remove_the_same_fraction_of_what_is_left_and_meet_the_target(target: float, rounds: int) -> None:
    p = round_fraction(target, rounds)
    left = 1.0
    for r in range(1, rounds + 1):
        left *= 1 - p
        assert cumulative_target(target, rounds, r) == pytest.approx(1 - left)
    assert left == pytest.approx(1 - target)
    assert cumulative_target(target, rounds, rounds) == target
    assert round_fraction(1 - 0.8**3, 3) == pytest.approx(0.2)  # open_lth's 20% per level
    assert step_target(0.5, original_total=100, current_total=80) == pytest.approx(1 - 50 / 80)
    with pytest.raises(ValueError):
        round_fraction(0.5, 0)


def test_global_masks_remove_the_smallest_survivors_across_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, 6.0, 0.5, 7.0]]))
        model[1].weight.copy_(torch.tensor([[0.1, 8.0], [-2.5, 9.0]]))
    previous = {"0": torch.ones(2, 4, dtype=torch.bool), "1": torch.tensor([[False, True], [True, True]])}
    masks = global_magnitude_masks(model, ["0", "1"], count=3, previous=previous)
    # 0.1 was already removed; the next three smallest magnitudes are 0.5, 1.0 and 2.0 (in two layers)
    assert masks["0"].tolist() == [[False, False, True, True], [True, True, False, True]]
    assert masks["1"].tolist() == [[False, True], [True, True]]
    assert model[0].weight[1, 2] == 0.5  # the model itself is untouched


# -------------------------------------------------------------------------------------- masks during training
@pytest.mark.parametrize("keep", [True, False])
def test_mask_keeper_holds_the_zeros_through_training(keep: bool) -> None:
    model = _net()
    masks = global_magnitude_masks(model, ["stem.0", "classifier"], count=300)
    apply_masks(model, masks)
    before = copy.deepcopy(model.state_dict())
    callbacks = [MaskKeeper({"kind": "mask", "layers": list(masks)})] if keep else []
    Trainer(TrainConfig(epochs=2, lr=0.1), device="cpu", progress=False).fit(model, _batches(), callbacks=callbacks)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert not torch.equal(weight[mask], before[f"{name}.weight"][mask])  # the survivors trained
        assert bool((weight[~mask] == 0).all()) is keep  # without the keeper, the pruned entries move


# ------------------------------------------------------------------------- weight granularity, end to end
def test_weight_imp_meets_the_target_and_the_masks_survive_finetuning_replay_and_export(
        tiny_data: Path, tmp_path: Path) -> None:
    model = _net()
    out = tmp_path / "run"
    result = compress(model, arch="samplenet", data=tiny_data, method="imp", target=0.8, epochs=1, bench_batches=(),
                      seed=1, out=out, method_options={"imp_granularity": "weight", "imp_rounds": 2,
                                                       "imp_epochs": 1})
    method = result.report["method"]
    assert method["stages"] == ["mask"] and method["target_metric"] == "conv+linear weights"
    assert abs(method["achieved"] - 0.8) <= 0.01
    assert [r["round"] for r in method["imp"]["rounds_detail"]] == [1, 2]
    assert "do not make dense runtimes faster" in method["imp"]["note"]
    trained = result.model
    measured = sparsity(trained)
    assert abs(measured["overall"] - 0.8) <= 0.01 and measured["overall"] == method["achieved"]
    masked = {n: m for n, m in trained.named_modules() if hasattr(m, MASK)}
    assert set(masked) == set(measured["layers"])
    for layer in masked.values():
        assert bool((layer.weight[~getattr(layer, MASK)] == 0).all())
    payload = torch.load(out / "compressed.pt", map_location="cpu", weights_only=True)
    assert payload["transforms"] == [{"kind": "mask", "layers": sorted(masked, key=list(masked).index)}]
    loaded = load_compressed(out / "compressed.pt")
    for name, layer in masked.items():
        assert torch.equal(getattr(loaded.get_submodule(name), MASK), getattr(layer, MASK))
    assert sparsity(loaded)["overall"] == measured["overall"]
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(loaded(x), trained(x))
    graph = onnx.load(str(out / "compressed.onnx"))
    weights = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    weights = [w for w in weights if w.ndim in (2, 4)]  # Conv and Gemm weights
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert abs(zeros - 0.8) <= 0.01
    sizes = result.report["compressed"], result.report["original"]
    assert sizes[0]["onnx_deflated_bytes"] < 0.5 * sizes[1]["onnx_deflated_bytes"]


def test_rounds_retrain_on_imp_data(tiny_data: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    other = tmp_path / "other.npz"
    np.savez(other, x=rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8), y=np.arange(24) % 10)
    options = {"imp_granularity": "weight", "imp_rounds": 1, "imp_data": str(other)}
    cfg = CompressConfig(method="imp", target=0.5, method_options=options).validate()
    method = build_method("imp", options)
    loaded = pipeline.load(_net(), arch="samplenet")
    prepared = pipeline.prepare(loaded, str(tiny_data), None, normalize="none", cfg=cfg, method=method)
    compressed = pipeline.compress_model(loaded.model, method, prepared, cfg, torch.device("cpu"))
    facts = compressed.report["imp"]
    assert facts["data"] == str(other) and facts["train_images"] == 24  # not the 40 images of --data
    assert facts["rounds_detail"][0]["train"]["epochs"] == 1


# ------------------------------------------------------------------------------------------------ rewinding
def test_weight_rewind_to_a_recorded_epoch_gives_those_weights_on_the_survivors(tmp_path: Path) -> None:
    model = _net()
    trained = copy.deepcopy(model)
    Trainer(TrainConfig(epochs=2, lr=0.05), device="cpu", progress=False).fit(
        trained, _batches(), callbacks=[RecordEpochs(tmp_path / "run")])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch-0.pt", "epoch-1.pt", "epoch-2.pt"]
    method = build_method("imp", {"imp_granularity": "weight", "imp_rewind": "epoch:1",
                                  "imp_run": str(tmp_path / "run"), "imp_epochs": 0, "imp_rounds": 2})
    ctx = _ctx(trained, 0.5)
    method.check(ctx)
    result = method.apply(trained, ctx)
    epoch1 = torch.load(tmp_path / "run" / "epoch-1.pt", weights_only=True)
    layers = result.records[0]["layers"]
    for key, value in result.model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and owner in layers:
            mask = getattr(result.model.get_submodule(owner), MASK)
            assert torch.equal(value[mask], epoch1[key][mask]) and bool((value[~mask] == 0).all())
        elif not key.endswith(MASK):
            assert torch.equal(value, epoch1[key]), key
    assert not torch.equal(epoch1["stem.0.weight"], trained.state_dict()["stem.0.weight"])
    assert sparsity(result.model)["overall"] == pytest.approx(0.5, abs=1e-4)


def test_filter_rewind_to_init_keeps_init_filters_and_shrinks_the_model() -> None:
    model = _net()
    method = build_method("imp", {"imp_rewind": "init", "imp_epochs": 0, "imp_rounds": 2})
    result = method.apply(model, _ctx(model, 0.4))
    init = reinitialise(model, seed=0)
    stem, stem_init = result.model.get_submodule("stem.0").weight, init.get_submodule("stem.0").weight
    assert stem.shape[0] < stem_init.shape[0]
    assert [r["kind"] for r in result.records] == ["prune", "prune"]
    for row in stem:  # every surviving filter of the first conv (input channels untouched) is an init filter
        assert any(torch.equal(row, candidate) for candidate in stem_init)
    assert result.report["imp"]["rounds_detail"][-1]["achieved"] == pytest.approx(0.4, abs=0.02)


# ------------------------------------------------------------------------------------------------- bad input
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("extra", "match"), [
    (["--imp-rounds", "0"], "--imp-rounds must be in [1, inf"),
    (["--imp-rewind", "epoch:2"], "--imp-run"),
    (["--imp-rewind", "epoch:2", "--imp-run", "{empty}"], "no epoch-2.pt"),
    (["--imp-rewind", "late"], "--imp-rewind must be original, init or epoch:K"),
    (["--imp-data", "{empty}/nothing.npz"], "nothing.npz"),
])
def test_bad_imp_input_is_one_line_exit_2_and_writes_nothing(extra: list[str], match: str, tiny_data: Path,
                                                              tmp_path: Path) -> None:
    model_file = tmp_path / "net.pt"
    torch.save({"state_dict": _net().state_dict(), "arch": "samplenet"}, model_file)
    (tmp_path / "empty").mkdir()
    digests = [_digest(model_file), _digest(tiny_data)]
    out = tmp_path / "out"
    args = [str(model_file), "--method", "imp", "--data", str(tiny_data), "--bench-batch", "none", "--out", str(out),
            *[a.format(empty=tmp_path / "empty") for a in extra]]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    message = result.stderr.strip()
    assert "Traceback" not in result.output and len(message.splitlines()) == 1, message
    assert match.lower() in message.lower(), message
    assert not out.exists() and not list(tmp_path.glob(".compressor-stage-*"))
    assert [_digest(model_file), _digest(tiny_data)] == digests
