"""Tests of the matrix-based Rényi α-entropy estimators (issue 3, "Tests")."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from compressor.errors import InputError
from compressor.scoring import kernels
from compressor.scoring import mutual_info as mi
from compressor.scoring.kernels import gram_matrix, kernel_width, label_gram, pairwise_sq_dists
from compressor.scoring.mutual_info import (
    SaturationWarning,
    check_saturation,
    conditional_mutual_information,
    is_saturated,
    joint_gram,
    mutual_information,
    renyi_entropy,
    score_candidates,
)

F64 = torch.float64
ALPHAS = (0.5, 1.0, 1.01, 2.0, 3.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _planted(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes; channels [A, B, noise, noise, noise, copy of A], each one scalar per sample (a pooled map).

    A carries label bit 0, B label bit 1 (class-dependent mean + unit noise), so A and B are complementary and
    together determine the label. Scalar channels keep the test in the regime where the estimator is sharp; with
    many dimensions per channel the distances concentrate and the duplicate's gain approaches a new channel's.
    """
    g = _gen(seed)
    y = torch.arange(n) % 4
    bit = [((y >> b) & 1).to(F64)[:, None] * 6.0 for b in (0, 1)]
    a, b = (m + torch.randn(n, 1, generator=g, dtype=F64) for m in bit)
    noise = [torch.randn(n, 1, generator=g, dtype=F64) for _ in range(3)]
    return torch.stack([a, b, *noise, a.clone()]), y


# --- distances, widths, Gram matrices ------------------------------------------------------------------------------


def test_pairwise_sq_dists_matches_direct_difference_and_is_safe() -> None:
    x = _randn(3, 20, 7) * 100 + 1e4  # large offset: the centring keeps the expansion accurate
    d2 = pairwise_sq_dists(x)
    direct = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(d2, direct, rtol=1e-9, atol=1e-6)
    assert (d2 >= 0).all() and (d2.diagonal(dim1=-2, dim2=-1) == 0).all()
    x32 = (_randn(20, 7) + 1e3).float()  # float32, norms² ~ 7e6 against distances² ~ 14
    direct32 = ((x32[:, None, :] - x32[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(pairwise_sq_dists(x32), direct32, rtol=1e-3, atol=1e-3)
    dup = torch.cat([x[0], x[0]])  # exact duplicate samples: distance exactly representable as >= 0
    assert (pairwise_sq_dists(dup) >= 0).all()


def test_kernel_width_rules() -> None:
    x = _randn(4, 64, 10)
    med = kernel_width(x)
    assert med.shape == (4,)
    torch.testing.assert_close(kernel_width(7.0 * x), 7.0 * med)  # scale-aware
    direct = torch.cdist(x[0], x[0])[tuple(torch.triu_indices(64, 64, 1))].median()
    torch.testing.assert_close(med[0], direct)
    big = _randn(64, 1024)
    assert kernel_width(big, rule="silverman").item() == pytest.approx(5 * 64 ** (-1 / 1028))
    assert kernel_width(big * 1000, rule="silverman").item() > 4.9  # ignores the scale
    # Duplicated samples do not drag the median to 0; a constant variable gets the documented fallback 1.
    half = x[0, :32]
    assert kernel_width(torch.cat([half, half, half])).item() > 0.5 * med[0].item()
    assert kernel_width(torch.zeros(10, 3, dtype=F64)).item() == 1.0


def test_unit_trace() -> None:
    x = _randn(5, 40, 6)
    sigmas = ("median", "silverman", 0.7, torch.linspace(0.5, 3.0, 5, dtype=F64))
    for sigma in sigmas:
        a = gram_matrix(x, sigma=sigma)
        assert a.shape == (5, 40, 40)
        torch.testing.assert_close(a.diagonal(dim1=-2, dim2=-1), torch.full((5, 40), 1 / 40, dtype=F64))
        torch.testing.assert_close(a, a.transpose(-1, -2))
        assert torch.linalg.eigvalsh(a).min() > -1e-12  # PSD
    y = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3])
    for ay in (label_gram(y, 4), label_gram(torch.nn.functional.one_hot(y, 4).float()), label_gram(y, 4, sigma=1.0)):
        assert float(ay.trace()) == pytest.approx(1.0)
    joint = joint_gram(gram_matrix(x[0]), gram_matrix(x), label_gram(torch.arange(40) % 3, dtype=F64))
    torch.testing.assert_close(joint.diagonal(dim1=-2, dim2=-1).sum(-1), torch.ones(5, dtype=F64))


def test_label_gram_kernels() -> None:
    y = torch.tensor([0, 0, 1, 2])
    k = label_gram(y, 3, dtype=F64) * 4
    assert k.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    k_gauss = label_gram(y, 3, sigma=2.0, dtype=F64) * 4
    assert k_gauss[0, 2].item() == pytest.approx(math.exp(-1 / 4))  # ||e_0 - e_1||² = 2 -> exp(-2 / (2 σ²))
    with pytest.raises(ValueError, match="labels must lie"):
        label_gram(torch.tensor([0, 3]), 3)


# --- entropy -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entropy_bounds(alpha: float) -> None:
    n = 48
    top = math.log2(n)
    grams = [gram_matrix(_randn(6, n, d, seed=d), sigma=s) for d in (1, 8) for s in ("median", 0.3, 3.0)]
    s = renyi_entropy(torch.stack(grams), alpha=alpha)
    assert s.shape == (6, 6)
    assert (s > 0).all() and (s < top).all()
    # The bounds are attained: a constant variable (rank one) and well-separated samples (A = I/N).
    const = gram_matrix(torch.zeros(n, 3, dtype=F64))
    ident = gram_matrix(torch.arange(n, dtype=F64)[:, None] * 100, sigma=1.0)
    assert renyi_entropy(const, alpha=alpha).item() == pytest.approx(0.0, abs=1e-9)
    assert renyi_entropy(ident, alpha=alpha).item() == pytest.approx(top, abs=1e-9)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_label_entropy_closed_form(alpha: float) -> None:
    """The equality-kernel Gram has the class frequencies as eigenvalues: S_α is the Rényi entropy of p."""
    counts = torch.tensor([10, 5, 3, 2])
    y = torch.repeat_interleave(torch.arange(4), counts)
    p = counts.double() / counts.sum()
    expected = -(p * p.log2()).sum() if alpha == 1.0 else (p**alpha).sum().log2() / (1 - alpha)
    assert renyi_entropy(label_gram(y, 4, dtype=F64), alpha=alpha).item() == pytest.approx(expected.item(), abs=1e-9)


def test_alpha2_shortcut_equals_eigen_route() -> None:
    x = _randn(8, 64, 5)
    grams = torch.stack([gram_matrix(x, sigma=s) for s in ("median", 0.4, 4.0)])
    grams = torch.cat([grams, joint_gram(grams[0], grams[1])[None]])
    shortcut = renyi_entropy(grams, alpha=2)
    eig = mi._renyi_entropy_eig(grams, 2.0)
    assert (shortcut - eig).abs().max().item() <= 1e-5
    g32 = grams.float()
    assert (renyi_entropy(g32, alpha=2) - mi._renyi_entropy_eig(g32, 2.0)).abs().max().item() <= 1e-4


def test_alpha2_never_decomposes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _randn(4, 32, 3)
    a, ay = gram_matrix(x), label_gram(torch.arange(32) % 2, dtype=F64)
    expected = score_candidates(a[0], a, ay, alpha=2)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("eigvalsh called on the alpha=2 route")

    monkeypatch.setattr(torch.linalg, "eigvalsh", boom)
    renyi_entropy(a, alpha=2.0)
    torch.testing.assert_close(score_candidates(a[0], a, ay, alpha=2), expected)
    with pytest.raises(AssertionError, match="eigvalsh called"):
        renyi_entropy(a, alpha=1.01)


# --- joint Gram, MI, CMI ---------------------------------------------------------------------------------------------


def test_joint_gram_hadamard_semantics() -> None:
    x = _randn(50, 4)
    sigma = kernel_width(x)
    a = gram_matrix(x, sigma=sigma)
    # A variable joined with itself is its Gram at width σ/√2 (Hadamard semantics), not A itself ...
    torch.testing.assert_close(joint_gram(a, a), gram_matrix(x, sigma=sigma / math.sqrt(2)))
    assert (joint_gram(a, a) - a).abs().max() > 1e-3
    # ... except for 0/1 kernels such as the labels, where it is idempotent.
    ay = label_gram(torch.arange(50) % 3, dtype=F64)
    torch.testing.assert_close(joint_gram(ay, ay), ay)
    b, c = gram_matrix(_randn(50, 2, seed=1)), gram_matrix(_randn(50, 2, seed=2))
    torch.testing.assert_close(joint_gram(a, b, c), joint_gram(c, joint_gram(b, a)))
    torch.testing.assert_close(joint_gram(a, None), a)
    torch.testing.assert_close(joint_gram(a, torch.stack([b, c]))[1], joint_gram(a, c))


@pytest.mark.parametrize("alpha", (1.0, 1.01, 2.0))
def test_mutual_information_with_itself(alpha: float) -> None:
    # Exact for discrete variables (0/1 kernels): I(Y; Y) = S(Y).
    ay = label_gram(torch.tensor([0] * 7 + [1] * 5 + [2] * 4), 3, dtype=F64)
    assert mutual_information(ay, ay, alpha=alpha).item() == pytest.approx(renyi_entropy(ay, alpha=alpha).item())
    # A continuous variable that is discrete in effect (tight clusters far apart, width between the scales).
    centres = torch.arange(40) % 5 * 10.0
    x = (centres[:, None] + 1e-4 * _randn(40, 2)).to(F64)
    a = gram_matrix(x, sigma=1.0)
    assert mutual_information(a, a, alpha=alpha).item() == pytest.approx(renyi_entropy(a, alpha=alpha).item(), abs=1e-3)
    # In general the Hadamard joint makes I(X; X) = 2 S(X) - S(A∘A) <= S(X); still above MI with anything else.
    g = gram_matrix(_randn(3, 128, 1))
    s, i_self = renyi_entropy(g[0], alpha=alpha), mutual_information(g[0], g[0], alpha=alpha)
    assert 0 < i_self <= s + 1e-9
    assert (mutual_information(g[0], g[1:], alpha=alpha) < i_self).all()


@pytest.mark.parametrize("alpha", (1.01, 2.0))
def test_independent_variables_have_near_zero_mi(alpha: float) -> None:
    n = 512
    x, z = _randn(n, 1, seed=1), _randn(n, 1, seed=2)
    w = x + 0.3 * _randn(n, 1, seed=3)  # dependent control: the test could not pass with a constant estimator
    a, b, c = gram_matrix(torch.stack([x, z, w]))
    s = renyi_entropy(a, alpha=alpha).item()
    # No clamping: the finite-sample estimate may dip slightly below 0 (see mutual_information's Notes).
    assert abs(mutual_information(a, b, alpha=alpha).item()) < 0.05 * s
    assert mutual_information(a, c, alpha=alpha).item() > 0.3 * s


@pytest.mark.parametrize("alpha", (0.5, 1.01, 2.0, 3.0))
def test_cmi_nonnegative_on_random_data(alpha: float) -> None:
    for seed in range(5):
        g = gram_matrix(_randn(4, 64, 1 + seed, seed=seed), sigma="median")
        z = joint_gram(g[2], g[3])
        for a_z in (g[2], z, None):
            assert conditional_mutual_information(g[0], g[1], a_z, alpha=alpha).item() >= -1e-6
    torch.testing.assert_close(
        conditional_mutual_information(g[0], g[1], None, alpha=alpha), mutual_information(g[0], g[1], alpha=alpha)
    )


def test_invariance_to_sample_order() -> None:
    x, y = _randn(5, 96, 3), torch.arange(96) % 4
    perm = torch.randperm(96, generator=_gen(7))

    def measures(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        g, ay = gram_matrix(feats), label_gram(labels, 4, dtype=F64)
        return torch.cat(
            [
                renyi_entropy(g, alpha=1.01),
                mutual_information(g, ay, alpha=2),
                conditional_mutual_information(g[0], ay, joint_gram(g[1], g[2]), alpha=1.01)[None],
                score_candidates(g[4], g[:4], ay, alpha=1.01),
                kernel_width(feats),
            ]
        )

    torch.testing.assert_close(measures(x[:, perm], y[perm]), measures(x, y), rtol=1e-9, atol=1e-9)
    # Permuting one variable against the other breaks the pairing, so the test can fail.
    assert not torch.allclose(measures(x[:, perm], y), measures(x, y), atol=1e-3)


# --- the batched greedy step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", (1.0, 1.01, 2.0))
@pytest.mark.parametrize("with_base", (False, True))
def test_score_candidates_equals_loop(alpha: float, with_base: bool) -> None:
    g = gram_matrix(_randn(9, 48, 3))
    ay = label_gram(torch.arange(48) % 3, dtype=F64)
    base = joint_gram(g[7], g[8]) if with_base else None
    loop = torch.stack([mutual_information(joint_gram(base, g[c]), ay, alpha=alpha) for c in range(7)])
    torch.testing.assert_close(score_candidates(base, g[:7], ay, alpha=alpha), loop)
    torch.testing.assert_close(score_candidates(base, g[:7], ay, alpha=alpha, chunk_size=3), loop)
    assert score_candidates(base, g[:0], ay, alpha=alpha).shape == (0,)


@pytest.mark.parametrize("alpha", (1.01, 2.0))
@pytest.mark.parametrize("seed", (0, 1, 2))
def test_planted_informative_noise_and_duplicates(alpha: float, seed: int) -> None:
    feats, y = _planted(seed)
    g, ay = gram_matrix(feats), label_gram(y, 4, dtype=F64)
    first = score_candidates(None, g, ay, alpha=alpha)
    informative, noise = first[[0, 1, 5]], first[2:5]
    assert informative.min() > 5 * noise.max(), first
    # After selecting A: the gain of each candidate is I(Y; A ∪ c) - I(Y; A) = I(Y; c | A) (chain rule).
    gain = score_candidates(g[0], g, ay, alpha=alpha) - first[0]
    torch.testing.assert_close(gain, conditional_mutual_information(g, ay, g[0], alpha=alpha))
    assert gain[1] > 0.8 * first[1]  # B is complementary to A: it keeps almost all of its information
    assert gain[5] < 0.15 * gain[1], gain  # the copy of A adds almost nothing by comparison
    assert int(gain[1:].argmax()) + 1 == 1  # the greedy step picks B, not the copy nor noise


def _unchunked_gram(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The batched formula of ``gram_matrix``, all variables at once (before it was built a chunk at a time)."""
    d2 = pairwise_sq_dists(x)
    return torch.exp(-d2 / (2.0 * sigma * sigma)[..., None, None]) / x.shape[-2]


@pytest.mark.parametrize("shape", [(7, 40, 3), (2, 3, 33, 5), (1, 64, 16), (13, 130, 4)])
@pytest.mark.parametrize("rule", ["median", "silverman", "fixed", "per-variable"])
def test_chunked_gram_equals_the_unchunked_formula(shape: tuple[int, ...], rule: str) -> None:
    x = _randn(*shape, seed=len(shape))
    batch = shape[:-2]
    sigma = {"median": kernel_width(x), "silverman": kernel_width(x, rule="silverman"), "fixed": torch.tensor(
        1.7, dtype=F64), "per-variable": torch.linspace(0.5, 3.0, math.prod(batch), dtype=F64).reshape(batch)}[rule]
    arg = rule if rule in ("median", "silverman") else sigma
    expected = _unchunked_gram(x, sigma)
    for chunk in (None, 1, 2, 5, 1000):
        got, widths = gram_matrix(x, sigma=arg, chunk_size=chunk, return_sigma=True)
        assert got.shape == expected.shape and widths.shape == batch
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-15)
        torch.testing.assert_close(widths, sigma.expand(batch), rtol=0.0, atol=0.0)
    for unbatched in (x.reshape(-1, *shape[-2:])[0], _randn(1, 50, 2)[0]):  # (N, D): the plain formula
        g, w = gram_matrix(unbatched, return_sigma=True)
        torch.testing.assert_close(g, _unchunked_gram(unbatched, kernel_width(unbatched)), rtol=0.0, atol=0.0)
        assert w.shape == ()


def test_gram_of_inputs_that_require_grad_is_differentiable() -> None:
    x = _randn(3, 20, 2).requires_grad_()
    g = gram_matrix(x)
    g.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(gram_matrix(x), g.detach(), rtol=0.0, atol=0.0)


def test_gram_chunks_are_cache_sized_on_cpu() -> None:
    x = torch.zeros(4, 256, 1, dtype=F64)
    assert kernels._gram_chunk(256, x) == 4  # 2 MiB of 256x256 float64 matrices
    assert kernels._gram_chunk(1024, x) == 1
    assert kernels._gram_chunk(64, x.float()) == 128


@pytest.mark.parametrize("alpha", (2.0, 1.01, 0.5))
@pytest.mark.parametrize("with_base", (False, True))
def test_score_candidates_by_index_and_squares_equals_copying_the_candidates(alpha: float, with_base: bool) -> None:
    """A greedy step that passes the channels left by index (and the squared stack at α = 2) scores exactly what
    ``grams[left]`` scored (squared at every step), for any chunking."""
    g = gram_matrix(_randn(23, 64, 4, seed=3))
    ay = label_gram(torch.arange(64) % 5, dtype=F64)
    base = joint_gram(g[4], g[17]) if with_base else None
    left = [c for c in range(23) if c not in (4, 17)][::-1]
    copied = score_candidates(base, g[left], ay, alpha=alpha, chunk_size=23)
    squares = g.square()
    for chunk in (None, 1, 3, 8, 100):
        for sq in (None, squares):
            got = score_candidates(base, g, ay, alpha=alpha, chunk_size=chunk, candidates=left, squares=sq)
            torch.testing.assert_close(got, copied, rtol=0.0, atol=1e-12)
            got = score_candidates(base, g[left], ay, alpha=alpha, chunk_size=chunk,
                                   squares=None if sq is None else squares[left])
            torch.testing.assert_close(got, copied, rtol=0.0, atol=1e-12)
    assert score_candidates(base, g, ay, alpha=alpha, candidates=[]).shape == (0,)
    with pytest.raises(ValueError, match="squares must have the shape"):
        score_candidates(base, g, ay, alpha=alpha, squares=squares[:3])


def test_eigenvalue_path_defaults_to_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    real = torch.linalg.eigvalsh

    def spy(a: torch.Tensor) -> torch.Tensor:
        batches.append(a.shape[1] if a.ndim == 4 else 1)
        return real(a)

    g = gram_matrix(_randn(20, 32, 2))
    ay = label_gram(torch.arange(32) % 2, dtype=F64)
    expected = torch.stack([mutual_information(g[c], ay, alpha=1.01) for c in range(20)])
    monkeypatch.setattr(mi.torch.linalg, "eigvalsh", spy)
    torch.testing.assert_close(score_candidates(None, g, ay, alpha=1.01), expected)
    assert batches[1:] == [8, 8, 4]  # after S(Y): chunks of EIG_CHUNK["cpu"] candidates
    assert mi.EIG_CHUNK["cpu"] == 8 and mi.EIG_CHUNK["other"] > 8
    sizes = {n: mi._eig_chunk(torch.zeros(1, n, n, dtype=F64)) for n in (64, 256, 512, 1024)}
    assert sizes == {64: 8, 256: 8, 512: 2, 1024: 1}  # fewer, larger matrices per batch


# --- saturation ------------------------------------------------------------------------------------------------------


def test_is_saturated() -> None:
    top = math.log2(64)
    flags = is_saturated(torch.tensor([top, top * 0.985, top * 0.97, 0.0]), 64, tol=0.02)
    assert flags.tolist() == [True, True, False, False]


def test_saturation_warning_on_unscaled_large_maps() -> None:
    x = 10.0 * torch.randn(3, 64, 1024, generator=_gen(0))  # 3 channels, N=64 samples, unscaled 32×32 maps
    sigma = kernel_width(x, rule="silverman")
    with pytest.warns(SaturationWarning, match=r"3 of 3 .*sigma=4\.9.*--cmi-kernel-width"):
        mask = check_saturation(gram_matrix(x, sigma=sigma), sigma=sigma)
    assert mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = check_saturation(gram_matrix(x, sigma="median"), sigma=kernel_width(x))
    assert not mask.any()


# --- input errors ----------------------------------------------------------------------------------------------------


def test_errors_are_actionable() -> None:
    x = _randn(10, 2)
    a = gram_matrix(x)
    with pytest.raises(InputError, match="alpha must be a finite number > 0"):
        renyi_entropy(a, alpha=0.0)
    with pytest.raises(InputError, match="--cmi-kernel-width"):
        gram_matrix(x, sigma=-1.0)
    with pytest.raises(InputError, match="median, silverman"):
        kernel_width(x, rule="scott")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(\.\.\., N, D\)"):
        gram_matrix(torch.ones(10, dtype=F64))
    with pytest.raises(ValueError, match=r"\(C, N, N\)"):
        score_candidates(None, a, a, alpha=2)


@pytest.mark.gpu
def test_score_candidates_on_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    feats, y = _planted(0)
    g, ay = gram_matrix(feats), label_gram(y, 4, dtype=F64)
    for alpha in (1.01, 2.0):
        cpu = score_candidates(g[0], g, ay, alpha=alpha)
        gpu = score_candidates(g[0].cuda(), g.cuda(), ay.cuda(), alpha=alpha)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu)
        left = [5, 3, 1]
        torch.testing.assert_close(
            score_candidates(None, g.cuda(), ay.cuda(), alpha=alpha, candidates=left, squares=g.square().cuda()).cpu(),
            score_candidates(None, g[left], ay, alpha=alpha))
        g_cuda = gram_matrix(feats.cuda())
        torch.testing.assert_close(g_cuda.cpu(), g)
