"""Matrix-based Rényi α-entropy, mutual information and conditional mutual information (pure torch functions).

Each variable (one channel's flattened feature map over N calibration samples, or the labels) is represented by an
N×N Gram matrix normalised to unit trace, built by :mod:`compressor.scoring.kernels`; entropies are functionals of
its eigenvalues, and a *set* of variables is the Hadamard product of their Gram matrices. No densities are
estimated. Everything here is stateless, works on whatever device and floating dtype its inputs have, and is batched
over leading dimensions so that all candidates of one greedy step of ``--method cmi`` (issue 3) are scored together
(:func:`score_candidates`: one matrix product at α = 2, a few batched ``eigvalsh`` calls otherwise).

References
----------
.. [1] L. G. Sanchez Giraldo, M. Rao and J. C. Principe, "Measures of entropy from data using infinitely divisible
   kernels", IEEE Trans. Inf. Theory 61(1):535-548, 2015.
.. [2] S. Yu, L. G. Sanchez Giraldo, R. Jenssen and J. C. Principe, "Multivariate extension of matrix-based Rényi's
   α-order entropy functional", IEEE Trans. PAMI 42(11):2960-2966, 2020 (arXiv:1808.07912).
.. [3] T. Vu-Van, T. Du Thanh, N. Ho and M. Vu, "Pruning deep convolutional neural network using conditional mutual
   information", arXiv:2411.18578, 2024.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from compressor.errors import InputError

# Re-exported for compressor.methods.cmi and compressor.methods.mipp, which still import them from here; new code
# imports them from compressor.scoring.kernels.
from .kernels import gram_matrix as gram_matrix
from .kernels import kernel_width as kernel_width
from .kernels import label_gram as label_gram
from .kernels import pairwise_sq_dists as pairwise_sq_dists

__all__ = [
    "SaturationWarning",
    "check_saturation",
    "conditional_mutual_information",
    "is_saturated",
    "joint_gram",
    "mutual_information",
    "renyi_entropy",
    "score_candidates",
]


class SaturationWarning(UserWarning):
    """A Gram matrix is nearly the identity: its entropy sits at log2 N and the information measures are useless."""


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise InputError(f"the Rényi order alpha must be a finite number > 0 (e.g. --cmi-alpha 1.01 or 2); got {alpha}")
    return alpha


def _trace(a: torch.Tensor) -> torch.Tensor:
    return a.diagonal(dim1=-2, dim2=-1).sum(dim=-1)


def _renyi_entropy_frobenius(a: torch.Tensor) -> torch.Tensor:
    """``S_2(A) = -log2 (||A||_F² / (tr A)²)``; no eigendecomposition."""
    return -torch.log2((a * a).sum(dim=(-2, -1)) / _trace(a) ** 2)


def _renyi_entropy_eig(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """``S_α`` from the eigenvalues of ``A / tr A``; ``α = 1`` is von Neumann.

    Eigenvalues at the eigensolver's rounding level (``<= N · eps · λ_max``, including the negative ones) are set to
    0: they are zero in exact arithmetic, and ``λ^α`` with α < 1 would blow their rounding up (``√1e-16 = 1e-8``).
    """
    lam = torch.linalg.eigvalsh(a)
    floor = lam[..., -1:] * (a.shape[-1] * torch.finfo(a.dtype).eps)
    lam = torch.where(lam > floor, lam, torch.zeros_like(lam)) / _trace(a).unsqueeze(-1)
    if alpha == 1.0:
        return -torch.xlogy(lam, lam).sum(dim=-1) / math.log(2.0)
    return torch.log2((lam**alpha).sum(dim=-1)) / (1.0 - alpha)


def renyi_entropy(a: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Matrix-based Rényi entropy of order α, in bits [1]_.

    ``S_α(A) = 1/(1-α) · log2 Σ_k λ_k(A)^α`` over the eigenvalues λ_k of the unit-trace Gram matrix A.

    Parameters
    ----------
    a : torch.Tensor
        Gram matrices, shape ``(..., N, N)``, symmetric PSD. They are used up to scale (``A / tr A``).
    alpha : float
        Order, finite and ``> 0``. ``alpha == 2`` uses the Frobenius identity (no eigendecomposition);
        ``alpha == 1`` is the limit α → 1, the von Neumann entropy ``-Σ λ_k log2 λ_k``.

    Returns
    -------
    torch.Tensor
        Entropies of shape ``a.shape[:-2]``, in ``[0, log2 N]``.

    Notes
    -----
    For symmetric A, ``Σ_k λ_k² = tr(A²) = Σ_ij A_ij² = ||A||_F²``, so ``S_2(A) = -log2 ||A||_F²``: O(N²) instead of
    the O(N³) ``eigvalsh``. Bounds: with ``λ_k >= 0`` and ``Σ λ_k = 1``, S is 0 for rank one (a constant variable,
    ``K = 1 1ᵀ``) and ``log2 N`` for ``A = I/N`` (every sample unlike every other). S_α is non-increasing in α, so
    ``S_2 <= S_1.01``. At α = 1 both numerator and denominator vanish; l'Hôpital gives
    ``lim_{α→1} S_α = -Σ_k λ_k log2 λ_k`` (``d/dα log2 Σ λ^α = Σ λ^α ln λ / (ln 2 Σ λ^α)`` at α = 1, over ``-1``),
    which is computed directly rather than rejected. Near α = 1 the ``1/(1-α)`` factor amplifies rounding (×100 at
    1.01): prefer float64 there.
    """
    alpha = _check_alpha(alpha)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"Gram matrices must have shape (..., N, N); got {tuple(a.shape)}")
    if alpha == 2.0:
        return _renyi_entropy_frobenius(a)
    return _renyi_entropy_eig(a, alpha)


def joint_gram(*grams: torch.Tensor | None) -> torch.Tensor:
    """Gram matrix of a set of variables: the Hadamard product, renormalised to unit trace [2]_.

    ``A_{X1..Xk} = (A_1 ∘ A_2 ∘ ... ∘ A_k) / tr(A_1 ∘ ... ∘ A_k)``

    Parameters
    ----------
    *grams : torch.Tensor or None
        Gram matrices of shape ``(..., N, N)``; leading dimensions broadcast (a ``(N, N)`` base with a ``(C, N, N)``
        stack gives ``C`` joints). ``None`` entries (an empty conditioning set) are skipped.

    Returns
    -------
    torch.Tensor
        The joint Gram matrix, unit trace.

    Notes
    -----
    This is not idempotent: for a Gaussian Gram, ``A ∘ A ∝ exp(-||x_i - x_j||² / σ²)``, the Gram of the same
    variable at width ``σ/√2``, which has a larger entropy. It is idempotent for 0/1 kernels
    (:func:`~compressor.scoring.kernels.label_gram`).
    The product is renormalised after every factor, so long products (a running selected set) cannot underflow
    through the ``1/N^k`` scale of the diagonal.
    """
    present = [g for g in grams if g is not None]
    if not present:
        raise ValueError("joint_gram needs at least one Gram matrix")
    out = present[0] / _trace(present[0])[..., None, None]
    for g in present[1:]:
        out = out * g
        out = out / _trace(out)[..., None, None]
    return out


def mutual_information(a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Matrix-based mutual information ``I_α(A; B) = S_α(A) + S_α(B) - S_α(A ∘ B)`` in bits [2]_.

    Parameters
    ----------
    a, b : torch.Tensor
        Unit-trace Gram matrices ``(..., N, N)`` of the two variables (or sets, see :func:`joint_gram`); leading
        dimensions broadcast.
    alpha : float
        Rényi order, see :func:`renyi_entropy`.

    Returns
    -------
    torch.Tensor
        Shape of the broadcast leading dimensions; in ``[-ε, min(S(A), S(B))]``.

    Notes
    -----
    The upper bound holds because ``S(A ∘ B) >= max(S(A), S(B))`` [2]_. The lower bound, ``S(A∘B) <= S(A) + S(B)``,
    is not guaranteed for finite N: at α = 2 it reads ``mean(a² b²) >= mean(a²) mean(b²)`` over the pairs of
    samples (``a``, ``b`` the kernel entries), so independent variables can give small negative values (about
    -0.002 bits for N = 512). Do not clamp them away when testing for independence.
    """
    joint = joint_gram(a, b)
    s_a, s_b = renyi_entropy(a, alpha=alpha), renyi_entropy(b, alpha=alpha)
    return s_a + s_b - renyi_entropy(joint, alpha=alpha)


def conditional_mutual_information(
    a_x: torch.Tensor, a_y: torch.Tensor, a_z: torch.Tensor | None, *, alpha: float
) -> torch.Tensor:
    """Matrix-based conditional mutual information in bits [2]_, [3]_.

    ``I_α(X; Y | Z) = S_α(X, Z) + S_α(Y, Z) - S_α(X, Y, Z) - S_α(Z)``, each joint a :func:`joint_gram`.

    Parameters
    ----------
    a_x, a_y : torch.Tensor
        Unit-trace Gram matrices ``(..., N, N)``; leading dimensions broadcast.
    a_z : torch.Tensor or None
        Gram matrix of the conditioning set (already a joint Gram for several variables); ``None`` means no
        conditioning and returns :func:`mutual_information`.
    alpha : float
        Rényi order, see :func:`renyi_entropy`.

    Returns
    -------
    torch.Tensor
        Shape of the broadcast leading dimensions. Usually ``>= 0``; as for :func:`mutual_information` there is no
        finite-sample guarantee, so values slightly below 0 are possible for (conditionally) independent variables.
    """
    if a_z is None:
        return mutual_information(a_x, a_y, alpha=alpha)
    xz, yz = joint_gram(a_x, a_z), joint_gram(a_y, a_z)
    xyz = joint_gram(xz, a_y)
    s = [renyi_entropy(m, alpha=alpha) for m in (xz, yz, xyz, a_z)]
    return s[0] + s[1] - s[2] - s[3]


def score_candidates(
    a_base: torch.Tensor | None,
    a_candidates: torch.Tensor,
    a_y: torch.Tensor,
    *,
    alpha: float,
    chunk_size: int | None = None,
    candidates: Sequence[int] | torch.Tensor | None = None,
    squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every candidate of one greedy step: ``I_α(Y; base ∪ c)`` for each candidate c, batched.

    ``score_c = S_α(B ∘ A_c) + S_α(Y) - S_α(B ∘ A_c ∘ Y)``, with ``B`` the running joint Gram of the conditioning and
    already selected variables ([3]_, greedy forward selection). For ``alpha == 2`` the ``2C`` entropies are Frobenius
    norms from one matrix product; otherwise they come from batched ``eigvalsh`` calls of ``chunk_size`` candidates,
    on the inputs' device.

    Parameters
    ----------
    a_base : torch.Tensor or None
        Running joint Gram ``(N, N)`` of the selected/conditioning set; ``None`` for an empty set.
    a_candidates : torch.Tensor
        Candidate Gram matrices ``(C, N, N)``.
    a_y : torch.Tensor
        Label Gram ``(N, N)`` (:func:`~compressor.scoring.kernels.label_gram`).
    alpha : float
        Rényi order, see :func:`renyi_entropy`.
    chunk_size : int, optional
        Score at most this many candidates per batched call to bound memory (about ``2 · chunk · N²`` values).
        ``None``: all at once at ``alpha == 2``; on the eigenvalue path a few (:data:`EIG_CHUNK`: 8 on a CPU up
        to N = 256 in float64, fewer above, where a batched ``eigvalsh`` is no faster than one matrix at a time
        and the whole batch's temporaries are about 8.5 Gram stacks; 64 on a GPU). The chunking does not change
        the result.
    candidates : sequence of int or torch.Tensor, optional
        Indices into ``a_candidates`` of the candidates to score, in this order (default: all). The same as passing
        ``a_candidates[candidates]``, without copying the stack: a greedy step passes the channels still left.
    squares : torch.Tensor, optional
        ``a_candidates.square()``, computed once by a caller that scores the same stack many times (a greedy
        selection); used at ``alpha == 2`` only. Its rows are then weighted all at once, the selected ones included,
        which reads the stack once instead of copying and squaring the candidates at every step.

    Returns
    -------
    torch.Tensor
        Scores of shape ``(C,)`` (``(len(candidates),)``), equal to
        ``mutual_information(joint_gram(a_base, a_candidates[c]), a_y)``. Since
        ``I(Y; B ∪ c) = I(Y; B) + I(Y; c | B)``, the argmax is also the candidate of largest CMI given B.
    """
    if a_candidates.ndim != 3:
        raise ValueError(f"a_candidates must have shape (C, N, N); got {tuple(a_candidates.shape)}")
    if squares is not None and squares.shape != a_candidates.shape:
        raise ValueError(f"squares must have the shape of a_candidates {tuple(a_candidates.shape)}; "
                         f"got {tuple(squares.shape)}")
    alpha = _check_alpha(alpha)
    s_y = renyi_entropy(a_y, alpha=alpha)
    index = None if candidates is None else torch.as_tensor(candidates, dtype=torch.long).reshape(-1)
    count = a_candidates.shape[0] if index is None else index.numel()
    if count == 0:
        return a_candidates.new_zeros(0)
    if alpha == 2.0 and squares is not None:
        return _score_frobenius(a_base, a_candidates, a_y, squares=squares, index=index) + s_y
    if alpha == 2.0:
        step = chunk_size or count
    else:
        step = chunk_size or _eig_chunk(a_candidates)
    out = []
    for start in range(0, count, step):
        if index is None:
            chunk = a_candidates[start: start + step]
        else:
            chunk = a_candidates[index[start: start + step].to(a_candidates.device)]
        if alpha == 2.0:
            out.append(_score_frobenius(a_base, chunk, a_y) + s_y)
            continue
        joint = joint_gram(a_base, chunk)
        both = torch.stack((joint, joint_gram(joint, a_y)))  # (2, c, N, N): one batched decomposition
        s = _renyi_entropy_eig(both, alpha)
        out.append(s[0] + s_y - s[1])
    return torch.cat(out)


#: Default candidates per ``eigvalsh`` batch of :func:`score_candidates` on a CPU and on other devices, at most
#: and within a budget of bytes per batch of candidate Grams: 8 on a CPU up to N = 256 in float64, 2 at N = 512
#: and 1 from N = 724 (smaller batches were no slower, one thread); 64 on a GPU up to N = 1024.
EIG_CHUNK = {"cpu": 8, "other": 64}
EIG_CHUNK_BYTES = {"cpu": 4 * 2**20, "other": 512 * 2**20}


def _eig_chunk(a: torch.Tensor) -> int:
    kind = "cpu" if a.device.type == "cpu" else "other"
    return max(1, min(EIG_CHUNK[kind], EIG_CHUNK_BYTES[kind] // (a.shape[-1] ** 2 * a.element_size())))


def _score_frobenius(a_base: torch.Tensor | None, cands: torch.Tensor, a_y: torch.Tensor, *,
                     squares: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """``S_2(B∘A_c) - S_2(B∘A_c∘Y)`` for all c without forming the joints (``score_candidates`` at α = 2).

    ``||B∘A_c||_F² = <A_c∘A_c, B∘B>`` and ``tr(B∘A_c) = <diag A_c, diag B>``, and likewise with ``B∘Y`` in place of
    B, so both entropies of every candidate come from one ``(C, N²) @ (N², 2)`` product and one ``(C, N) @ (N, 2)``.
    With ``squares`` (``cands ∘ cands``) the products run over all its rows and ``index`` picks the candidates'.
    """
    b = torch.ones_like(a_y) if a_base is None else a_base
    by = b * a_y
    weights = torch.stack((b * b, by * by)).flatten(1).to(cands.dtype)  # (2, N²)
    sq = cands.flatten(1).square() if squares is None else squares.flatten(1)
    sq_norms = sq @ weights.T  # (C, 2)
    diags = torch.stack((b.diagonal(), by.diagonal())).to(cands.dtype)  # (2, N)
    traces = cands.diagonal(dim1=-2, dim2=-1) @ diags.T  # (C, 2)
    if index is not None:
        index = index.to(sq_norms.device)
        sq_norms, traces = sq_norms[index], traces[index]
    s = -torch.log2(sq_norms / traces**2)
    return s[:, 0] - s[:, 1]


def is_saturated(entropy: torch.Tensor | float, n: int, *, tol: float = 0.02) -> torch.Tensor:
    """Whether entropies lie within ``tol · log2 N`` of their maximum ``log2 N``.

    Parameters
    ----------
    entropy : torch.Tensor or float
        Entropies in bits (any shape).
    n : int
        Number of samples N.
    tol : float
        Relative tolerance.

    Returns
    -------
    torch.Tensor
        Boolean tensor of the shape of ``entropy``.
    """
    top = math.log2(n)
    return torch.as_tensor(entropy) >= top - tol * top


def check_saturation(
    a: torch.Tensor,
    *,
    sigma: float | torch.Tensor | None = None,
    tol: float = 0.02,
    what: str = "feature",
) -> torch.Tensor:
    """Warn with a :class:`SaturationWarning` when Gram matrices are nearly the identity ``I/N``.

    Uses ``S_2`` (one Frobenius norm each): Rényi entropies decrease with α, so if ``S_2`` is saturated the entropy
    of every order α < 2 is too.

    Parameters
    ----------
    a : torch.Tensor
        Unit-trace Gram matrices ``(..., N, N)``.
    sigma : float or torch.Tensor, optional
        The kernel width(s) used, quoted in the message.
    tol : float
        Relative tolerance of :func:`is_saturated`.
    what : str
        What the matrices describe, e.g. ``"layer3.2.conv1"``, quoted in the message.

    Returns
    -------
    torch.Tensor
        Boolean mask of saturated matrices, shape ``a.shape[:-2]``.

    Notes
    -----
    With ``A ≈ I/N`` every sample looks unlike every other: ``S(X) ≈ log2 N``, any joint containing X is saturated
    too, so ``I(Y; X) ≈ S(Y)`` for every channel and ``I(Y; X | Z) ≈ 0`` given any saturated set; the scores no
    longer discriminate between channels and the ranking is arbitrary.
    """
    n = a.shape[-1]
    s2 = renyi_entropy(a, alpha=2.0)
    mask = is_saturated(s2, n, tol=tol)
    count = int(mask.sum())
    if count:
        width = ""
        if sigma is not None:
            sig = torch.as_tensor(sigma).detach().float().flatten()
            width = f" at kernel width sigma={float(sig.min()):.4g}" + (
                f"..{float(sig.max()):.4g}" if sig.numel() > 1 and bool(sig.max() > sig.min()) else ""
            )
        warnings.warn(
            f"{count} of {mask.numel()} {what} Gram matrices are nearly the identity{width}: their entropy is "
            f"within {tol:.0%} of log2 N = {math.log2(n):.2f} bits, so every channel looks equally informative and "
            f"the information measures collapse. The kernel width is too small for the scale of the data: use the "
            f"scale-aware median width (the default), pass a larger --cmi-kernel-width, or pool the maps before "
            f"the kernel.",
            SaturationWarning,
            stacklevel=2,
        )
    return mask
