"""Gaussian and label Gram matrices for the matrix-based Rényi α-entropy estimators (pure torch functions).

Each variable (one channel's flattened feature map over N calibration samples, or the labels) is represented by an
N×N Gram matrix normalised to unit trace (:func:`gram_matrix`, :func:`label_gram`); the kernel width comes from a
scale-aware rule (:func:`kernel_width`). The entropies and information measures of these matrices live in
:mod:`compressor.scoring.mutual_info`. Everything here is stateless, works on whatever device and floating dtype its
inputs have, and is batched over leading dimensions.

References
----------
.. [1] L. G. Sanchez Giraldo, M. Rao and J. C. Principe, "Measures of entropy from data using infinitely divisible
   kernels", IEEE Trans. Inf. Theory 61(1):535-548, 2015.
.. [2] T. Vu-Van, T. Du Thanh, N. Ho and M. Vu, "Pruning deep convolutional neural network using conditional mutual
   information", arXiv:2411.18578, 2024.
.. [3] B. W. Silverman, "Density Estimation for Statistics and Data Analysis", Chapman & Hall, 1986.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from compressor.errors import InputError

__all__ = [
    "GRAM_CHUNK_BYTES",
    "WidthRule",
    "gram_matrix",
    "kernel_width",
    "label_gram",
    "pairwise_sq_dists",
]

WidthRule = Literal["median", "silverman"]
_WIDTH_RULES = ("median", "silverman")


def _check_samples(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., N, D) with samples on dim -2; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")


def pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between all pairs of samples.

    ``D_ij = ||x_i - x_j||² = ||x_i||² + ||x_j||² - 2 <x_i, x_j>``, computed with one matrix product.

    Parameters
    ----------
    x : torch.Tensor
        Samples, shape ``(N, D)`` or batched ``(..., N, D)``.

    Returns
    -------
    torch.Tensor
        Shape ``(..., N, N)``, symmetric, ``>= 0``, with an exactly zero diagonal.

    Notes
    -----
    The expansion loses precision when the norms are large compared with the distances, so the samples are centred
    first (distances are translation invariant, and after centring ``||x_i|| <= max_j ||x_i - x_j||``); rounding can
    still leave tiny negative values, which are clamped to 0.
    """
    _check_samples(x)
    x = x - x.mean(dim=-2, keepdim=True)
    sq = (x * x).sum(dim=-1)
    d2 = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (x @ x.transpose(-1, -2))
    d2 = d2.clamp_min(0.0)
    d2.diagonal(dim1=-2, dim2=-1).zero_()
    return d2


def kernel_width(x: torch.Tensor, *, rule: WidthRule = "median") -> torch.Tensor:
    """Gaussian kernel width σ for each variable in ``x``.

    - ``"median"`` (default): the median of the nonzero pairwise distances ``||x_i - x_j||``, i < j. It scales with
      the data, so the kernel neither collapses to the identity nor to all-ones, whatever the map size or units.
      A constant variable (all distances zero) gets σ = 1; its Gram matrix is all-ones for any σ.
    - ``"silverman"``: the rule of [2]_, ``σ = 5 · N^(-1/(4+d))`` with ``d = D`` the flattened map size. This is
      Silverman's rule of thumb [3]_ with the data's standard deviation replaced by the constant 5, so it ignores
      the scale of the data and tends to 5 as d grows: on unscaled 32×32 maps the distances are in the hundreds,
      every Gram matrix is nearly the identity and every entropy saturates at log2 N (see
      :func:`~compressor.scoring.mutual_info.check_saturation`).

    Parameters
    ----------
    x : torch.Tensor
        Samples, shape ``(N, D)`` or batched ``(..., N, D)``.
    rule : {"median", "silverman"}
        The width rule.

    Returns
    -------
    torch.Tensor
        σ with shape ``x.shape[:-2]`` (a 0-d tensor for unbatched input), on ``x``'s device and dtype.
    """
    _check_samples(x)
    n, d = x.shape[-2], x.shape[-1]
    if rule == "silverman":
        return torch.full(x.shape[:-2], 5.0 * n ** (-1.0 / (4 + d)), dtype=x.dtype, device=x.device)
    if rule != "median":
        raise InputError(f"unknown kernel-width rule {rule!r}; use one of {', '.join(_WIDTH_RULES)}")
    return _median_width(pairwise_sq_dists(x))


def _median_width(d2: torch.Tensor) -> torch.Tensor:
    """Median of the nonzero off-diagonal distances from squared distances ``(..., N, N)``; 1 where all are zero."""
    n = d2.shape[-1]
    if n < 2:
        raise ValueError(f"the median rule needs at least 2 samples; got N={n}")
    iu = torch.triu_indices(n, n, offset=1, device=d2.device)
    pairs = d2[..., iu[0], iu[1]]
    # "Nonzero" up to the rounding of pairwise_sq_dists: duplicated samples must not drag the median to 0.
    tiny = pairs.amax(dim=-1, keepdim=True) * (64 * torch.finfo(d2.dtype).eps)
    pairs = torch.where(pairs > tiny, pairs, torch.full_like(pairs, float("nan")))
    med = torch.nanmedian(pairs, dim=-1).values.sqrt()
    return torch.nan_to_num(med, nan=1.0)


def _as_sigma(x: torch.Tensor, d2: torch.Tensor, sigma: float | torch.Tensor | WidthRule) -> torch.Tensor:
    if isinstance(sigma, str):
        return _median_width(d2) if sigma == "median" else kernel_width(x, rule=sigma)  # type: ignore[arg-type]
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(s).all() & (s > 0).all()):
        raise InputError(f"the kernel width must be a positive finite number (--cmi-kernel-width); got {sigma}")
    return s


def gram_matrix(
    x: torch.Tensor,
    *,
    sigma: float | torch.Tensor | WidthRule = "median",
    chunk_size: int | None = None,
    return_sigma: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Unit-trace Gaussian Gram matrix of each variable.

    ``K_ij = exp(-||x_i - x_j||² / (2σ²))`` and ``A = K / N``, so ``A_ii = 1/N`` and ``tr A = 1`` [1]_.

    Parameters
    ----------
    x : torch.Tensor
        Samples, shape ``(N, D)`` or batched ``(..., N, D)`` (e.g. ``(C, N, H*W)``: one variable per channel).
    sigma : float, torch.Tensor or {"median", "silverman"}
        Kernel width: a number, a tensor broadcastable to ``x.shape[:-2]`` (one width per variable), or a rule
        name passed to :func:`kernel_width`.
    chunk_size : int, optional
        Variables built per step (see Notes); ``None`` fits :data:`GRAM_CHUNK_BYTES` of Gram matrices per step
        (2 MiB on a CPU: 4 matrices at N = 256 in float64, 1 from N = 512). Any value gives the same result.
    return_sigma : bool
        Also return the widths used, shape ``x.shape[:-2]`` (what ``kernel_width(x, rule=sigma)`` returns for a
        rule), so that a caller needing both computes the pairwise distances once.

    Returns
    -------
    torch.Tensor or tuple of (torch.Tensor, torch.Tensor)
        Shape ``(..., N, N)``, symmetric positive semi-definite, unit trace; with ``return_sigma`` also σ.

    Notes
    -----
    The Gram matrices of a batch are built a chunk of variables at a time into one preallocated ``(..., N, N)``
    output: distances, median width and kernel of a whole ``(C, N, N)`` stack at once need about three stacks of
    temporaries, which saturate memory bandwidth on a CPU (2-3x slower at N = 256, C = 64..512 and at N = 1024, one
    thread; ``benchmarks/cmi_scoring.py``) and triple the peak memory. Each variable's matrix is computed exactly as
    in the batched formula. Inputs that require grad take the batched formula (the chunks are written in place).
    """
    _check_samples(x)
    n = x.shape[-2]
    batch = x.shape[:-2]
    rule = sigma if isinstance(sigma, str) else None
    if rule is not None and rule not in _WIDTH_RULES:
        raise InputError(f"unknown kernel-width rule {rule!r}; use one of {', '.join(_WIDTH_RULES)}")
    if rule == "silverman":
        s_all: torch.Tensor | None = kernel_width(x, rule="silverman")
    elif rule is None:
        s_all = _as_sigma(x, x.new_zeros(()), sigma)
        s_all = s_all.expand(batch) if s_all.ndim <= len(batch) else s_all  # a wrong shape fails as before
    else:
        s_all = None  # "median": per chunk, from the distances the kernel needs anyway
    if not batch or (s_all is not None and s_all.shape != batch) or (x.requires_grad and torch.is_grad_enabled()):
        # Unbatched (or a width shaped beyond the batch, which broadcasts into the output): the plain formula.
        d2 = pairwise_sq_dists(x)
        s = _as_sigma(x, d2, sigma) if s_all is None else s_all
        k = torch.exp(-d2 / (2.0 * s * s)[..., None, None]) / n
        return (k, s) if return_sigma else k
    flat = x.reshape(-1, n, x.shape[-1])
    count = flat.shape[0]
    out = torch.empty((count, n, n), dtype=x.dtype, device=x.device)
    widths = torch.empty(count, dtype=x.dtype, device=x.device)
    s_flat = None if s_all is None else s_all.reshape(count)
    step = max(int(chunk_size or _gram_chunk(n, x)), 1)
    for start in range(0, count, step):
        part = slice(start, min(start + step, count))
        d2 = pairwise_sq_dists(flat[part])
        s = _median_width(d2) if s_flat is None else s_flat[part]
        widths[part] = s
        # -d2 / (2σ²) of the batched formula, in place: (-a) / b and a / (-b) round alike.
        torch.exp(d2.div_(-(2.0 * s * s)[..., None, None]), out=out[part])
    out.div_(n)
    out = out.reshape(*batch, n, n)
    return (out, widths.reshape(batch)) if return_sigma else out


#: Bytes of Gram matrices built per step by :func:`gram_matrix` on a CPU (a few cache-sized matrices: one at
#: N >= 512 in float64) and on other devices (large batches keep an accelerator busy).
GRAM_CHUNK_BYTES = {"cpu": 2 * 2**20, "other": 256 * 2**20}


def _gram_chunk(n: int, x: torch.Tensor) -> int:
    budget = GRAM_CHUNK_BYTES["cpu" if x.device.type == "cpu" else "other"]
    return max(1, budget // (n * n * x.element_size()))


def label_gram(
    y: torch.Tensor,
    num_classes: int | None = None,
    *,
    sigma: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Unit-trace Gram matrix of class labels.

    Default (``sigma=None``): the equality kernel ``K_ij = [y_i = y_j] = <e_{y_i}, e_{y_j}>`` on one-hot vectors.
    With a number: the Gaussian kernel on one-hot vectors, ``K_ij = exp(-[y_i ≠ y_j] / σ²)`` (one-hots of different
    classes are at squared distance 2). ``A = K / N`` either way.

    Parameters
    ----------
    y : torch.Tensor
        Integer labels of shape ``(N,)`` or one-hot / probability rows of shape ``(N, num_classes)``.
    num_classes : int, optional
        Number of classes; checked against integer labels, inferred from one-hot rows.
    sigma : float, optional
        Width of the Gaussian kernel on one-hots; ``None`` is the equality kernel (the limit σ → 0).
    dtype : torch.dtype, optional
        Floating dtype of the result (default: the default dtype); match it to the feature Grams.

    Returns
    -------
    torch.Tensor
        Shape ``(N, N)``, unit trace, on ``y``'s device.

    Notes
    -----
    The equality kernel is the default because it is exact and needs no width: ``A`` is block diagonal with one block
    ``1 1ᵀ / N`` per class, whose eigenvalues are the class frequencies ``p_c``, so ``S_α(A)`` is exactly the Rényi
    entropy of the empirical label distribution, ``1/(1-α) log2 Σ_c p_c^α``, and ``A ∘ A = A``. A Gaussian kernel on
    one-hots with the width rule of [2]_ (σ ≈ 5) gives ``K_ij ≈ 0.96`` for different classes, a nearly rank-one
    matrix that hides most of the label information.
    """
    dtype = dtype or torch.get_default_dtype()
    if y.ndim == 2:
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"one-hot labels have {y.shape[1]} columns but num_classes={num_classes}")
        y = y.argmax(dim=1)
    elif y.ndim != 1:
        raise ValueError(f"labels must have shape (N,) or (N, num_classes); got {tuple(y.shape)}")
    elif num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{int(y.min())}, {int(y.max())}]")
    same = y.unsqueeze(0) == y.unsqueeze(1)
    if sigma is None:
        k = same.to(dtype)
    else:
        if not (math.isfinite(sigma) and sigma > 0):
            raise InputError(f"the label kernel width must be a positive finite number; got {sigma}")
        k = torch.where(same, 1.0, math.exp(-1.0 / (sigma * sigma))).to(dtype)
    return k / y.shape[0]
