"""``--method tucker``: the Method, its record and replay, chains, rank rules, options, and rank-adaptive training
as a Trainer callback.

Expected ranks and sizes marked "pre-redesign" were recorded from the code before issue 11 (``TuckerTransform``,
``adaptive_finetune``) on the same inputs; the redesign must not change them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor import compress, load_compressed
from compressor.errors import InputError, ModelLoadError, PruningError
from compressor.factorize import ConvShape, factorize_conv
from compressor.methods import tucker_adaptive as ta
from compressor.methods.base import Budget, MethodContext, replay
from compressor.methods.baselines import L1
from compressor.methods.tucker import Tucker, TuckerOptions, conv_shapes, measure_layer_latency, replay_tucker
from compressor.methods.tucker_modules import set_module, tucker_block
from compressor.metrics import count_macs, count_params
from compressor.models import create_model
from compressor.options import parse_options
from compressor.training import TrainConfig, Trainer

EXAMPLE = torch.zeros(1, 3, 16, 16)
TINY_RANKS = {"0": [8, 3], "3": [19, 11], "8": [20, 20]}  # pre-redesign: target 0.4 of params


def tiny_net(seed: int = 0) -> nn.Module:
    """3x3 convs with and without bias, a stride, a 1x1 and a depthwise conv (the last two stay dense)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    ).eval()


def ctx_for(original: nn.Module, example: torch.Tensor = EXAMPLE, *, metric: str = "params", target: float = 0.4,
            epochs: int = 0) -> MethodContext:
    return MethodContext(example=example, num_classes=4, device=torch.device("cpu"), seed=0,
                         budget=Budget(target, metric), original=original, epochs=epochs)


def tucker(**options: object) -> Tucker:
    """The method as ``--tucker-<option>`` flags build it."""
    return Tucker.from_values(options)  # type: ignore[return-value]


def apply(net: nn.Module, original: nn.Module | None = None, **kwargs: object):
    options = kwargs.pop("options", {})
    method = tucker(**options)  # type: ignore[arg-type]
    ctx = ctx_for(original if original is not None else net, **kwargs)  # type: ignore[arg-type]
    method.check(ctx)
    return method.apply(net, ctx)


# ------------------------------------------------------------------------------------------- end to end
def test_resnet20_through_compress_gives_plain_conv_onnx_and_round_trips(tiny_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    out = tmp_path / "r20"
    result = compress(model, arch="resnet20", data=tiny_data, method="tucker", target=0.33, bench_batches=(), out=out)
    report = result.report
    achieved = 1 - report["compressed"]["params"] / report["original"]["params"]
    assert 0.33 <= achieved <= 0.35 and report["compressed"]["params"] == 180616  # pre-redesign
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["top1_agreement"] == 1.0
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(out / "compressed.onnx")).graph
    assert all((n.domain or "ai.onnx") == "ai.onnx" for n in graph.node)  # no custom ops
    assert sum(n.op_type == "Conv" for n in graph.node) == sum(isinstance(m, nn.Conv2d) for m in result.model.modules())
    layers = report["method"]["tucker"]["layers"]
    assert layers and report["method"]["tucker"]["dense"] == {}  # every 3x3 conv of a random resnet20 shrinks
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(load_compressed(out / "compressed.pt")(x), result.model(x), rtol=0, atol=0)


def test_adaptive_with_distillation_through_compress(tiny_data: Path, tmp_path: Path) -> None:
    """``--tucker-adaptive --distill`` runs in the one Trainer; the saved record holds the trained ranks."""
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    result = compress(model, arch="resnet20", data=tiny_data, method="tucker", target=0.33, epochs=1, batch_size=4,
                      distill=True, method_options={"tucker_adaptive": True, "tucker_period": 2}, bench_batches=(),
                      out=tmp_path / "run")
    section = result.report["method"]["tucker"]
    assert set(section["trajectory"]) == set(section["layers"]) and "final_ranks" in section
    assert all(len(t) == 2 for t in section["trajectory"].values())  # the start, then after the one epoch
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_compressed(tmp_path / "run" / "compressed.pt")(x), result.model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the method
@pytest.mark.parametrize("metric, ranks, params", [
    ("params", TINY_RANKS, 9477), ("macs", {"0": [7, 3], "3": [18, 11], "8": [19, 19]}, 8888)])  # pre-redesign
def test_target_is_met_on_the_metric_and_ineligible_convs_stay_dense(metric: str, ranks: dict, params: int) -> None:
    net = tiny_net()
    result = apply(net, metric=metric)
    count = count_params if metric == "params" else (lambda m: count_macs(m, EXAMPLE))
    achieved = 1 - count(result.model) / count(net)
    section = result.report["tucker"]
    assert 0.4 <= achieved <= 0.42 and achieved == pytest.approx(section["achieved"])
    assert result.records == [{"kind": "tucker", "layers": ranks}] and count_params(result.model) == params
    assert "grouped" in section["dense"]["5"] and "1x1" in section["dense"]["6"]
    assert all(isinstance(r, int) for rs in result.records[0]["layers"].values() for r in rs)
    assert isinstance(net[0], nn.Conv2d) and result.callbacks == []  # the user's model is untouched


def test_replay_rebuilds_the_factorised_structure_exactly() -> None:
    result = apply(tiny_net())
    rebuilt = replay(tiny_net(seed=5), result.records, EXAMPLE)  # registered under "tucker" at import
    state = result.model.state_dict()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rebuilt.eval()(x), result.model(x), rtol=0, atol=0)


@pytest.mark.parametrize("ranks", [(5, 7), (32, 7), (5, 16), (32, 16)])
def test_tucker_block_matches_factorize_conv_layout(ranks: tuple[int, int]) -> None:
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True)
    made = factorize_conv(conv, rank_out=ranks[0], rank_in=ranks[1])
    built = tucker_block(conv, rank_out=ranks[0], rank_in=ranks[1])
    assert {k: v.shape for k, v in made.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert str(made) == str(built)


def test_replay_rejects_a_record_that_does_not_fit() -> None:
    with pytest.raises(ModelLoadError, match="not a groups=1 Conv2d"):
        replay_tucker(tiny_net(), {"kind": "tucker", "layers": {"5": [2, 2]}}, EXAMPLE)
    with pytest.raises(ModelLoadError, match="does not fit"):
        replay_tucker(tiny_net(), {"kind": "tucker", "layers": {"3": [64, 2]}}, EXAMPLE)


@pytest.mark.parametrize("rule", ["evbmf", "energy"])
def test_rank_rules_run_and_do_not_enforce_the_target(rule: str) -> None:
    torch.manual_seed(1)  # planted low rank: conv "8" has rank 4 on both modes, plus a little noise
    net = tiny_net()
    with torch.no_grad():
        a, b, g = torch.randn(32, 4), torch.randn(32, 4), torch.randn(4, 4, 3, 3)
        net[8].weight.copy_(torch.einsum("oa,ib,abhw->oihw", a, b, g) + 1e-3 * torch.randn(32, 32, 3, 3))
    result = apply(net, options={"rank_rule": rule, "energy": 0.999})
    assert result.records[0]["layers"]["8"] == [4, 4]
    assert "not enforced" in result.report["tucker"]["note"]


def test_energy_rule_ranks_grow_with_the_energy() -> None:
    expected = {0.3: {"0": [3, 1], "3": [6, 4], "8": [7, 7]}, 0.6: {"0": [6, 2], "3": [14, 9], "8": [15, 15]},
                0.9: {"8": [27, 27]}}  # pre-redesign
    net = tiny_net()
    for energy, ranks in expected.items():
        assert apply(net, options={"rank_rule": "energy", "energy": energy}).records[0]["layers"] == ranks


def test_resnet20_ranks_and_sizes_are_the_pre_redesign_ones() -> None:
    torch.manual_seed(0)
    original, example = create_model("resnet20").eval(), torch.zeros(1, 3, 32, 32)
    by_params = apply(original, example=example, target=0.33)
    by_macs = apply(original, example=example, metric="macs", target=0.5)
    assert count_params(by_params.model) == 180616 and count_macs(by_macs.model, example) == 20236416
    assert by_params.records[0]["layers"]["layer3.0.conv2"] == [46, 45]
    assert by_macs.records[0]["layers"]["layer3.0.conv2"] == [37, 37]


def test_after_pruning_only_the_rest_of_the_target_is_factorised() -> None:
    torch.manual_seed(0)
    original, example = create_model("resnet20").eval(), torch.zeros(1, 3, 32, 32)
    pruned = L1().apply(original, MethodContext(example=example, num_classes=10, device=torch.device("cpu"), seed=0,
                                                budget=Budget(0.2, "params"), original=original)).model
    result = apply(pruned, original, example=example, target=0.4)
    assert count_params(result.model) == 161593  # pre-redesign
    section = result.report["tucker"]
    assert section["achieved"] == pytest.approx(1 - count_params(result.model) / count_params(original))
    assert 0.4 <= section["achieved"] <= 0.42 and 0.2 < section["step_target"] < 0.4
    nothing = apply(pruned, original, example=example, target=0.15)
    assert nothing.records[0]["layers"] == {} and "nothing was factorised" in nothing.report["tucker"]["note"]


def test_unreachable_target_says_why() -> None:
    with pytest.raises(PruningError, match="cannot remove 95.0% of params"):
        apply(tiny_net(), target=0.95)


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("options, message", [
    ({"rank_rule": "svd"}, "--tucker-rank-rule must be one of target, evbmf, energy"),
    ({"energy": 0.0}, r"--tucker-energy must be in \(0, 1\]"),
    ({"tau": 1.5}, r"--tucker-tau must be in \(0, 1\)"),
    ({"adaptive": "yes"}, "--tucker-adaptive must be true or false"),
    ({"period": 1}, r"--tucker-period must be in \[2, inf\]"),
    ({"period": 2.5}, "--tucker-period must be an integer"),
    ({"rnak_rule": "evbmf"}, "did you mean --tucker-rank-rule"),
])
def test_bad_options_raise_one_line_input_errors(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_options(TuckerOptions, "tucker", options)
    assert "\n" not in str(info.value)


def test_method_contract() -> None:
    net = tiny_net()
    with pytest.raises(InputError, match="params or macs"):
        tucker().check(ctx_for(net, metric="filters"))
    assert tucker().options == TuckerOptions() and not tucker().needs_epochs()
    assert tucker(adaptive=True).needs_epochs() and tucker(tau=0.2).options.tau == 0.2
    assert [s.flag for s in Tucker.option_specs()] == [
        "--tucker-rank-rule", "--tucker-energy", "--tucker-adaptive", "--tucker-tau", "--tucker-period",
        "--tucker-latency-aware"]
    assert all(s.help and s.example for s in Tucker.option_specs())


# ------------------------------------------------------------------------------------------ rank-adaptive
def _problem(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


@pytest.fixture(scope="module")
def factorised() -> tuple[nn.Module, nn.Module, dict, dict]:
    """The original, the factorised model, its record and each factorised layer's input size."""
    torch.set_num_threads(1)
    net = tiny_net()
    result = apply(net)
    record = result.records[0]
    convs = {name: net.get_submodule(name) for name in record["layers"]}
    sizes = {name: s.in_hw for name, s in conv_shapes(net, convs, EXAMPLE, {}).items()}
    return net, result.model, record, sizes


def adapt(factorised: tuple, *, epochs: int = 2, lr: float = 0.05, tau: float = 0.1, period: int = 2,
          metric: str | None = None, teacher: nn.Module | None = None, optimizer: str = "sgd", device: str = "cpu"):
    """Train a copy of the factorised model with the callback; returns the Trainer's result and the callback."""
    _, model, record, sizes = factorised
    callback = ta.AdaptiveTucker(record, input_sizes=sizes, tau=tau, period=period, metric=metric)
    trainer = Trainer(TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer), device=device, progress=False,
                      callbacks=[callback])
    return trainer.fit(copy.deepcopy(model), _problem(), teacher=teacher), callback


def test_the_adaptive_option_returns_the_callback(factorised: tuple) -> None:
    net = factorised[0]
    result = apply(net, options={"adaptive": True, "tau": 0.3, "period": 3})
    (callback,) = result.callbacks
    assert isinstance(callback, ta.AdaptiveTucker) and (callback.tau, callback.period) == (0.3, 3)
    assert callback.metric == "params" and callback.input_sizes == factorised[3]
    assert callback.records() == result.records  # before training: the method's record
    assert result.report["tucker"]["adaptive"] and result.report["tucker"]["tau"] == 0.3
    assert apply(net, options={"adaptive": True, "rank_rule": "energy"}).callbacks[0].metric is None


def test_augment_and_truncate_keep_the_function(factorised: tuple) -> None:
    _, model, record, sizes = factorised
    model = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    wrapped = {}
    for name in record["layers"]:
        block = model.get_submodule(name)
        template = nn.Conv2d(block[0].in_channels, block[-1].out_channels, 3, stride=block.core.stride, padding=1,
                             bias=block[-1].bias is not None)
        wrapped[name] = (ta.AdaptiveTuckerConv(block, sizes[name]), template)
        set_module(model, name, wrapped[name][0])
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    layer, _ = wrapped["8"]
    layer.core.grad = torch.randn_like(layer.core)
    opt.step()  # Adam state for the core: its first and second moments move with it
    expected = model(x)
    for u in (layer.u_out, layer.u_in):
        u.grad = torch.randn_like(u)
    ranks = layer.ranks()
    layer.u_in.grad = torch.full_like(layer.u_in, float("inf"))  # a step the AMP scaler skipped: mode left alone
    ta.augment(layer, opt)
    assert layer.ranks() == [min(2 * ranks[0], 32), ranks[1]]
    layer.u_in.grad = torch.randn_like(layer.u_in)
    ta.augment(layer, opt)
    assert layer.ranks() == [min(2 * r, c) for r, c in zip(ranks, (32, 32))]  # u_out was at full rank already
    assert opt.state[layer.core]["exp_avg_sq"].shape == layer.core.shape
    for u in (layer.u_out, layer.u_in):
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    ta.truncate(wrapped, opt, tau=1e-6)
    assert layer.ranks() == ranks  # the padded directions carry nothing and go
    assert (opt.state[layer.core]["exp_avg_sq"] >= 0).all()
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    for name, (layer, template) in wrapped.items():
        set_module(model, name, layer.export(template)[0])
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_truncation_rank() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    norm = float(s.norm())
    assert ta.truncation_rank(s, 0.99) == 1 and ta.truncation_rank(s, 1e-9) == 4
    assert ta.truncation_rank(s, 0.5 / norm) == 3 and ta.truncation_rank(s, 1.2 / norm) == 2


def test_larger_tau_gives_smaller_ranks_and_the_record_replays(factorised: tuple) -> None:
    net, model, record, _ = factorised
    expected = {0.02: TINY_RANKS, 0.3: {"0": [7, 3], "3": [12, 8], "8": [13, 13]}}  # pre-redesign
    for tau, ranks in expected.items():
        result, callback = adapt(factorised, tau=tau)
        (trained,) = callback.records()
        assert trained == {"kind": "tucker", "layers": ranks} and len(result.history) == 2
        report = callback.report()["tucker"]
        assert set(report["trajectory"]) == set(record["layers"]) and report["final_ranks"] == ranks
        assert all(len(t) == 3 for t in report["trajectory"].values())
        assert all(h["ranks"] > 0 for h in result.history)  # the callback's column in the epoch records
        rebuilt = replay_tucker(tiny_net(seed=9), trained, EXAMPLE)
        rebuilt.load_state_dict(result.model.state_dict())
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(rebuilt.eval()(x), result.model.eval()(x), rtol=0, atol=0)
    assert isinstance(model[0], nn.Sequential) and isinstance(net[0], nn.Conv2d)  # inputs untouched


def test_ranks_grow_without_a_budget_and_the_budget_holds(factorised: tuple) -> None:
    _, model, record, _ = factorised
    start = sum(sum(r) for r in record["layers"].values())
    free_result, free = adapt(factorised, lr=0.5, tau=0.01, period=4)
    trajectory = free.report()["tucker"]["trajectory"]
    assert max(sum(sum(r) for r in t) for t in zip(*trajectory.values())) > start
    assert count_params(free_result.model) == 9910  # pre-redesign
    capped_result, capped = adapt(factorised, lr=0.5, tau=0.01, period=3, metric="params")  # epoch 1 ends on a probe
    assert 0.98 * count_params(model) <= count_params(capped_result.model) <= count_params(model)
    # The trajectory holds ranks after truncation (not the augmented bases of a cycle an epoch ended in): the last
    # entry is what was exported, and under a budget no entry exceeds the starting ranks' total by much.
    exported, trajectory = capped.records()[0]["layers"], capped.report()["tucker"]["trajectory"]
    assert all(t[-1] == exported[n] for n, t in trajectory.items() if n in exported)
    assert all(sum(sum(r) for r in t) <= 1.1 * start for t in zip(*trajectory.values()))


def test_adaptive_training_with_distillation_and_adamw(factorised: tuple) -> None:
    """In the one Trainer the callback works with any loss and optimizer (Adam's moments move with the core)."""
    net, model, _, _ = factorised
    teacher = copy.deepcopy(net)
    for optimizer in ("sgd", "adamw"):
        result, callback = adapt(factorised, lr=0.01, tau=0.05, period=2, metric="params", teacher=teacher,
                                 optimizer=optimizer)
        assert all(np.isfinite(h["loss"]) for h in result.history) and not result.model.training
        assert 0.98 * count_params(model) <= count_params(result.model) <= count_params(model)
        replay_tucker(tiny_net(), callback.records()[0], EXAMPLE).load_state_dict(result.model.state_dict())


@pytest.mark.gpu
def test_adaptive_training_on_cuda_with_amp_and_distillation(factorised: tuple) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA; none available")
    net, model, _, _ = factorised
    result, callback = adapt(factorised, lr=0.01, tau=0.05, period=2, metric="params", teacher=copy.deepcopy(net),
                             device="cuda")
    assert result.amp is True and all(np.isfinite(h["loss"]) for h in result.history)
    assert 0.98 * count_params(model) <= count_params(result.model) <= count_params(model)
    rebuilt = replay_tucker(tiny_net(), callback.records()[0], EXAMPLE)
    rebuilt.load_state_dict(result.model.cpu().state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rebuilt.eval()(x), result.model.eval()(x), rtol=0, atol=0)


def test_budget_ranks_trims_and_fills_to_the_budget() -> None:
    spectra = {"a": [torch.tensor([4.0, 3.0, 2.0, 1.0])] * 2, "b": [torch.tensor([4.0, 0.1, 0.05, 0.01])] * 2}

    def cost(name: str, ranks: list[int]) -> int:
        return sum(ranks)

    # over budget: b's weak directions go first; under budget: a's strong ones come back first
    assert ta.budget_ranks(spectra, {"a": [4, 4], "b": [4, 4]}, cost, 10) == {"a": [4, 4], "b": [1, 1]}
    assert ta.budget_ranks(spectra, {"a": [1, 1], "b": [1, 1]}, cost, 8) == {"a": [3, 3], "b": [1, 1]}
    assert ta.budget_ranks(spectra, {"a": [4, 4], "b": [4, 4]}, cost, 3) == {"a": [1, 1], "b": [1, 1]}


def test_zero_epochs_of_adaptive_training_change_nothing(factorised: tuple) -> None:
    _, model, record, _ = factorised
    result, callback = adapt(factorised, epochs=0)
    assert callback.records() == [record] and callback.report()["tucker"]["densified"] == []
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- latency-aware
def test_latency_aware_keeps_only_factorisations_that_pay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake timer: convs "0" and "3" are always slower factorised, "8" only below total rank 42 (it is at 45 when
    all three share the budget). The loop drops the worst slow layer per round and re-allocates: "8" alone then
    gets lower ranks, pays off, and still meets the target."""
    from compressor.methods import tucker as tucker_module

    def fake(conv: nn.Conv2d, shape: object, ranks: tuple[int, int], *, threads: object) -> dict:
        tucker_ms = {3: 0.5, 16: 0.2}.get(conv.in_channels, 0.1 * sum(ranks) / 42)
        return {"ranks": list(ranks), "dense_ms": 0.1, "tucker_ms": tucker_ms, "pays_off": tucker_ms < 0.1}

    monkeypatch.setattr(tucker_module, "measure_layer_latency", fake)
    net = tiny_net()
    result = apply(net, target=0.3, options={"latency_aware": True})
    section = result.report["tucker"]
    assert result.records[0]["layers"] == {"8": [18, 19]}  # pre-redesign
    assert "latency-aware" in section["dense"]["0"] and "latency-aware" in section["dense"]["3"]
    assert "8@23x22" in section["latency"]["measured"] and section["latency"]["rounds"] == 3
    assert 0.3 <= 1 - count_params(result.model) / count_params(net) <= 0.32
    monkeypatch.setattr(tucker_module, "measure_layer_latency", lambda *a, **k: {**fake(*a, **k), "pays_off": False})
    with pytest.raises(PruningError, match="none of the 3 eligible convs gets faster"):
        apply(net, target=0.3, options={"latency_aware": True})


def test_layer_latency_is_measured_with_onnxruntime() -> None:
    pytest.importorskip("onnxruntime")
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    timing = measure_layer_latency(conv, ConvShape.from_conv(conv, (16, 16)), (8, 4), threads=1)
    assert timing["dense_ms"] > 0 and timing["tucker_ms"] > 0 and timing["ranks"] == [8, 4]
