"""Tucker-2 decomposition, the three-conv block, cost formulas and rank allocation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import tensorly as tl
import torch
from torch import nn

from compressor.errors import InputError, PruningError
from compressor.factorize import (
    ConvShape,
    allocate_ranks_for_target,
    conv_cost,
    factorize_conv,
    select_ranks,
    tucker2_cost,
    tucker2_decompose,
    tucker2_shrinks,
)


def planted_kernel(c_out: int, c_in: int, k: int, ranks: tuple[int, int], *, seed: int = 0) -> torch.Tensor:
    """A kernel of exact multilinear rank ``ranks`` on the channel modes."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks[0], ranks[1], k, k, generator=g)
    u_out, u_in = torch.randn(c_out, ranks[0], generator=g), torch.randn(c_in, ranks[1], generator=g)
    return torch.einsum("oa,ib,abhw->oihw", u_out, u_in, core)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@contextmanager
def count_macs(model: nn.Module) -> Iterator[dict[str, int]]:
    """MACs of every Conv2d in ``model`` (one per weight per output position), summed per forward."""
    totals = {"macs": 0}

    def hook(module: nn.Conv2d, _inputs: object, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        per_position = module.out_channels * (module.in_channels // module.groups) * kh * kw
        totals["macs"] += output.shape[-2] * output.shape[-1] * per_position

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- decomposition -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rank_out", "rank_in"), [(12, 12), (16, 5), (5, 7), (3, 2)])
def test_exact_reconstruction_at_the_multilinear_rank(rank_out: int, rank_in: int) -> None:
    # Full rank in the multilinear sense: the kernel has exactly these ranks, so HOOI (through tensorly) is exact.
    weight = planted_kernel(16, 12, 3, (rank_out, rank_in))
    factors = tucker2_decompose(weight, rank_out=rank_out, rank_in=rank_in)
    assert factors.core.shape == (rank_out, rank_in, 3, 3)
    assert factors.u_out.shape == (16, rank_out) and factors.u_in.shape == (12, rank_in)
    assert rel_error(factors.reconstruct(), weight) <= 1e-5
    for u in (factors.u_out, factors.u_in):  # orthonormal columns
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-10, rtol=0)


def test_full_rank_is_exact_and_keeps_the_global_backend() -> None:
    weight = torch.randn(8, 6, 3, 3)
    before = tl.get_backend()
    assert rel_error(tucker2_decompose(weight, rank_out=8, rank_in=6).reconstruct(), weight) <= 1e-12
    assert rel_error(tucker2_decompose(weight, rank_out=8, rank_in=3).reconstruct(), weight) > 1e-2
    assert tl.get_backend() == before


def test_error_non_increasing_as_ranks_grow() -> None:
    weight = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(1))
    errors = [
        rel_error(tucker2_decompose(weight, rank_out=r_out, rank_in=r_in).reconstruct(), weight)
        for r_out, r_in in [(1, 1), (2, 2), (4, 3), (6, 6), (8, 8), (12, 10), (16, 12)]
    ]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-6
    # Along one mode at a time too.
    one_mode = [rel_error(tucker2_decompose(weight, rank_out=r, rank_in=6).reconstruct(), weight) for r in (2, 8, 16)]
    assert one_mode == sorted(one_mode, reverse=True)


def test_decomposition_is_deterministic() -> None:
    weight = torch.randn(10, 8, 3, 3)
    a, b = (tucker2_decompose(weight, rank_out=4, rank_in=3) for _ in range(2))
    assert torch.equal(a.core, b.core) and torch.equal(a.u_out, b.u_out) and torch.equal(a.u_in, b.u_in)


@pytest.mark.parametrize(("rank_out", "rank_in"), [(0, 2), (9, 2), (2, 0), (2, 7)])
def test_rank_out_of_range_rejected(rank_out: int, rank_in: int) -> None:
    with pytest.raises(ValueError, match="ranks must satisfy"):
        tucker2_decompose(torch.randn(8, 6, 3, 3), rank_out=rank_out, rank_in=rank_in)


# --- the factorised block ------------------------------------------------------------------------------------------

CONVS = [
    dict(in_channels=12, out_channels=16, kernel_size=3, stride=2, padding=1, bias=True),
    dict(in_channels=12, out_channels=16, kernel_size=3, stride=1, padding=2, dilation=2, bias=True),
    dict(in_channels=12, out_channels=16, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), bias=False),
    dict(in_channels=12, out_channels=16, kernel_size=3, padding=1, padding_mode="reflect", bias=True),
    dict(in_channels=12, out_channels=16, kernel_size=1, stride=2, bias=True),
]


def planted_conv(spec: dict, ranks: tuple[int, int], seed: int = 0) -> nn.Conv2d:
    """A 12 -> 16 conv from ``spec`` whose kernel has exact multilinear rank ``ranks``, with a random bias."""
    conv = nn.Conv2d(**spec)
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks[0], ranks[1], *conv.kernel_size, generator=g)
    u_out, u_in = torch.randn(16, ranks[0], generator=g), torch.randn(12, ranks[1], generator=g)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oa,ib,abhw->oihw", u_out, u_in, core))
        if conv.bias is not None:
            conv.bias.normal_(generator=g)
    return conv.eval()


def spec_id(spec: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in spec.items() if k not in ("in_channels", "out_channels"))


@pytest.mark.parametrize("spec", CONVS, ids=spec_id)
@pytest.mark.parametrize("ranks", [(5, 4), (16, 4), (5, 12), (16, 12)])
def test_block_output_matches_conv(spec: dict, ranks: tuple[int, int]) -> None:
    conv = planted_conv(spec, ranks)
    block = factorize_conv(conv, rank_out=ranks[0], rank_in=ranks[1])
    x = torch.randn(2, 12, 17, 15, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = conv(x), block(x)
    assert got.shape == expected.shape
    assert rel_error(got, expected) <= 1e-5
    names = [name for name, _ in block.named_children()]
    assert names == ["reduce"] * (ranks[1] < 12) + ["core"] + ["restore"] * (ranks[0] < 16)
    assert all(type(m) is nn.Conv2d for m in block)
    assert not block.training
    assert block.core.stride == conv.stride and block.core.padding == conv.padding
    assert block.core.dilation == conv.dilation and block.core.padding_mode == conv.padding_mode


def test_fold_in_gives_two_convs_and_bias_on_the_last() -> None:
    conv = planted_conv(CONVS[0], (16, 4))
    block = factorize_conv(conv, rank_out=16, rank_in=4)
    assert len(block) == 2 and block.reduce.bias is None
    assert block.core.weight.shape == (16, 4, 3, 3)
    torch.testing.assert_close(block.core.bias, conv.bias)
    block = factorize_conv(conv, rank_out=4, rank_in=12)
    assert len(block) == 2 and block.core.bias is None and block.core.weight.shape == (4, 12, 3, 3)
    torch.testing.assert_close(block.restore.bias, conv.bias)


def test_block_keeps_dtype_and_leaves_the_conv_alone() -> None:
    conv = nn.Conv2d(12, 16, 3, padding=1).double()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    block = factorize_conv(conv, rank_out=4, rank_in=3)
    assert all(p.dtype == torch.float64 and p.requires_grad for p in block.parameters())
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in state.items())
    assert set(vars(conv)) == set(vars(nn.Conv2d(12, 16, 3, padding=1).double()))


@pytest.mark.parametrize("groups", [2, 12])
def test_grouped_conv_rejected(groups: int) -> None:
    with pytest.raises(ValueError, match="groups=1"):
        factorize_conv(nn.Conv2d(12, 24, 3, groups=groups), rank_out=4, rank_in=2)
    with pytest.raises(ValueError, match="groups=1"):
        ConvShape.from_conv(nn.Conv2d(12, 24, 3, groups=groups), (8, 8))


# --- costs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", CONVS, ids=spec_id)
@pytest.mark.parametrize("ranks", [(5, 4), (16, 4), (5, 12), (16, 12)])
def test_costs_match_module_counts(spec: dict, ranks: tuple[int, int]) -> None:
    conv = nn.Conv2d(**spec).eval()
    x = torch.randn(1, 12, 17, 15)
    shape = ConvShape.from_conv(conv, (17, 15))
    with torch.no_grad(), count_macs(conv) as dense_macs:
        out = conv(x)
    assert shape.out_hw == tuple(out.shape[-2:])
    assert shape.dense_cost() == (n_params(conv), dense_macs["macs"])
    block = factorize_conv(conv, rank_out=ranks[0], rank_in=ranks[1])
    with torch.no_grad(), count_macs(block) as block_macs:
        block(x)
    assert tucker2_cost(shape, rank_out=ranks[0], rank_in=ranks[1]) == (n_params(block), block_macs["macs"])


def test_cost_formulas_by_hand() -> None:
    # 3x3, 16 -> 32, stride 2, 8x8 -> 4x4, bias.
    assert conv_cost(16, 32, 3, 4, 4, bias=True) == (32 * 16 * 9 + 32, 16 * 32 * 16 * 9)
    shape = ConvShape(c_in=16, c_out=32, kernel=(3, 3), in_hw=(8, 8), out_hw=(4, 4), bias=True)
    params = 16 * 4 + 4 * 8 * 9 + 8 * 32 + 32
    macs = 64 * 16 * 4 + 16 * 4 * 8 * 9 + 16 * 8 * 32
    assert tucker2_cost(shape, rank_out=8, rank_in=4) == (params, macs)
    assert tucker2_shrinks(shape, rank_out=8, rank_in=4)
    assert not tucker2_shrinks(shape, rank_out=32, rank_in=16)  # the identity factorisation only adds nothing
    # A 1x1 conv at high resolution: the reduce conv runs at input resolution, so MACs can grow.
    wide = ConvShape(c_in=16, c_out=16, kernel=(1, 1), in_hw=(32, 32), out_hw=(16, 16), bias=False)
    assert not tucker2_shrinks(wide, rank_out=8, rank_in=12)


# --- rank selection ------------------------------------------------------------------------------------------------


def test_select_ranks_finds_planted_ranks() -> None:
    g = torch.Generator().manual_seed(5)
    weight = planted_kernel(32, 24, 3, (6, 4), seed=5) + 0.01 * torch.randn(32, 24, 3, 3, generator=g)
    assert select_ranks(weight, rule="evbmf") == (6, 4)
    assert select_ranks(weight, rule="energy", energy=0.999) == (6, 4)
    r_out, r_in = select_ranks(weight, rule="energy", energy=0.5)
    assert 1 <= r_out <= 6 and 1 <= r_in <= 4
    with pytest.raises(InputError, match="rank rule"):
        select_ranks(weight, rule="svd")  # type: ignore[arg-type]


def test_select_ranks_is_at_least_one_on_noise() -> None:
    weight = torch.randn(16, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    assert min(select_ranks(weight, rule="evbmf")) >= 1


def conv_stack(seed: int = 0) -> dict[str, tuple[torch.Tensor, ConvShape]]:
    """Random 3x3 convs 3 -> 16 -> 32 -> 64 on 32x32 inputs, stride 2 from the second on."""
    torch.manual_seed(seed)
    layers, hw = {}, (32, 32)
    for i, (c_in, c_out, stride) in enumerate([(3, 16, 1), (16, 32, 2), (32, 64, 2), (64, 64, 1)]):
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        shape = ConvShape.from_conv(conv, hw)
        layers[f"conv{i}"], hw = (conv.weight.detach(), shape), shape.out_hw
    return layers


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_allocation_hits_a_third(metric: str) -> None:
    layers = conv_stack()
    result = allocate_ranks_for_target(layers, target=1 / 3, metric=metric)  # type: ignore[arg-type]
    assert result.achieved >= 1 / 3 and result.achieved <= 1 / 3 + 0.02, result
    # Recount from the ranks: kept layers at their dense cost, the others by the Tucker-2 formula.
    after = 0
    for name, (_, shape) in layers.items():
        ranks = result.ranks[name]
        cost = shape.dense_cost() if ranks is None else tucker2_cost(shape, rank_out=ranks[0], rank_in=ranks[1])
        after += getattr(cost, metric)
        if ranks is not None:
            assert tucker2_shrinks(shape, rank_out=ranks[0], rank_in=ranks[1])
    assert after == result.after
    assert result.before == sum(getattr(s.dense_cost(), metric) for _, s in layers.values())
    assert result.ranks["conv0"] is None or result.ranks["conv0"][1] == 3  # 3 input channels: never reduced


def test_allocation_against_a_model_total_and_unreachable_target() -> None:
    layers = conv_stack()
    convs = sum(s.dense_cost().params for _, s in layers.values())
    result = allocate_ranks_for_target(layers, target=0.2, total=convs + 10_000)
    assert 0.2 <= result.achieved <= 0.22 and result.before == convs + 10_000
    with pytest.raises(PruningError, match="cannot remove"):
        allocate_ranks_for_target(layers, target=0.995)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(InputError, match="open interval"):
            allocate_ranks_for_target(layers, target=bad)
