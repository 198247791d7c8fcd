"""EVBMF against planted low-rank matrices, and the energy rank rule."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.errors import InputError
from compressor.factorize.evbmf import energy_rank, evb_tau_threshold, evbmf, golden_section_minimize


def planted(rows: int, cols: int, signal: list[float], *, noise: float, seed: int) -> torch.Tensor:
    """``U diag(signal) V^T + noise * N(0, 1)`` with random orthonormal ``U``, ``V``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(signal), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(signal), generator=g, dtype=torch.float64))
    s = torch.tensor(signal, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_recovers_planted_rank_and_noise(seed: int) -> None:
    y = planted(60, 40, [60.0, 50.0, 40.0, 30.0, 25.0], noise=1.0, seed=seed)
    result = evbmf(y)
    assert result.rank == 5, f"seed {seed}: rank {result.rank}, sigma2 {result.sigma2}, threshold {result.threshold}"
    assert result.sigma2 == pytest.approx(1.0, rel=0.1)
    # The posterior shrinks each kept singular value, the weaker ones relatively more.
    observed = torch.linalg.svdvals(y)[:5]
    assert torch.all(result.singular_values < observed)
    ratio = result.singular_values / observed
    assert torch.all(ratio > 0.75) and torch.all(ratio[1:] <= ratio[:-1])


@pytest.mark.parametrize("seed", range(3))
def test_recovers_rank_of_factor_product_at_smaller_noise(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    y = torch.randn(60, 5, generator=g) @ torch.randn(5, 40, generator=g) + 0.5 * torch.randn(60, 40, generator=g)
    result = evbmf(y)
    assert result.rank == 5
    assert result.sigma2 == pytest.approx(0.25, rel=0.15)


def test_transpose_invariant() -> None:
    y = planted(60, 40, [60.0, 50.0, 40.0, 30.0, 25.0], noise=1.0, seed=7)
    a, b = evbmf(y), evbmf(y.T)
    assert a.rank == b.rank == 5
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-9)
    torch.testing.assert_close(a.singular_values, b.singular_values)


@pytest.mark.parametrize("seed", range(3))
def test_pure_noise_has_rank_zero(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    assert evbmf(torch.randn(60, 40, generator=g)).rank == 0


def test_weak_component_below_threshold_is_dropped() -> None:
    # Noise edge is about sigma * (sqrt(60) + sqrt(40)) = 14; the EVB threshold is about 15.5 sigma.
    y = planted(60, 40, [60.0, 50.0, 40.0, 5.0], noise=1.0, seed=3)
    assert evbmf(y).rank == 3


def test_known_sigma2_gives_the_analytic_threshold_and_shrinkage() -> None:
    y = planted(60, 40, [60.0, 50.0, 40.0, 30.0, 25.0], noise=1.0, seed=1)
    L, m, sigma2 = 40, 60, 1.0
    result = evbmf(y, sigma2=sigma2)
    tau = evb_tau_threshold(L / m)
    assert result.threshold == pytest.approx(math.sqrt(m * sigma2 * (1 + tau) * (1 + (L / m) / tau)))
    gamma = torch.linalg.svdvals(y)
    assert result.rank == int((gamma >= result.threshold).sum())
    g = gamma[: result.rank]
    c = 1 - (L + m) * sigma2 / g**2
    expected = g / 2 * (c + torch.sqrt(c**2 - 4 * L * m * sigma2**2 / g**4))
    torch.testing.assert_close(result.singular_values, expected)
    # A huge noise variance keeps nothing; H caps the rank.
    assert evbmf(y, sigma2=1e4).rank == 0
    assert evbmf(y, sigma2=sigma2, H=2).rank == 2


def test_tau_threshold() -> None:
    # alpha = 1 solves log(1 + tau) = tau / 2; the reference code's 2.5129 * sqrt(alpha) is exact only there.
    tau = evb_tau_threshold(1.0)
    assert tau == pytest.approx(2.5129, abs=1e-4)
    assert math.log1p(tau) == pytest.approx(tau / 2, rel=1e-12)
    for alpha in (0.01, 0.3, 0.7):
        t = evb_tau_threshold(alpha)
        xi = math.log1p(t) / t + alpha * math.log1p(t / alpha) / t - 1
        assert abs(xi) < 1e-10
        assert t > math.sqrt(alpha)


def test_zero_matrix_and_bad_input() -> None:
    result = evbmf(torch.zeros(5, 7))
    assert result.rank == 0 and result.singular_values.numel() == 0
    with pytest.raises(ValueError, match="2-D"):
        evbmf(torch.zeros(3))
    with pytest.raises(ValueError, match="H must be"):
        evbmf(torch.ones(3, 4), H=4)
    with pytest.raises(ValueError, match="sigma2"):
        evbmf(torch.ones(3, 4), sigma2=0.0)


def test_golden_section_finds_minimum() -> None:
    assert golden_section_minimize(lambda x: (x - 0.3) ** 2, -2.0, 5.0) == pytest.approx(0.3, abs=1e-6)
    # The minimum at an end of the bracket is returned too.
    assert golden_section_minimize(lambda x: x, 1.0, 2.0) == 1.0


@pytest.mark.parametrize(
    ("values", "energy", "expected"),
    [
        ([3.0, 2.0, 1.0], 1.0, 3),  # all the energy needs every non-zero value
        ([3.0, 2.0, 1.0, 0.0, 0.0], 1.0, 3),  # trailing zeros are never needed
        ([1.0, 2.0, 3.0], 9 / 14, 1),  # unsorted input; exactly 9 of 14 with the largest one
        ([3.0, 2.0, 1.0], 9 / 14 + 1e-9, 2),
        ([3.0, 2.0, 1.0], 1e-12, 1),
        ([2.0, 2.0, 2.0, 2.0], 0.5, 2),
        ([0.0, 0.0], 0.5, 0),
        ([], 0.9, 0),
    ],
)
def test_energy_rank(values: list[float], energy: float, expected: int) -> None:
    assert energy_rank(torch.tensor(values), energy) == expected


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5])
def test_energy_rank_rejects_bad_fraction(energy: float) -> None:
    with pytest.raises(InputError, match="energy"):
        energy_rank(torch.ones(3), energy)


def test_energy_rank_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        energy_rank(torch.tensor([1.0, -1.0]), 0.5)
