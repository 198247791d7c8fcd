"""Information through prediction, its matrix-based Rényi alternative, and the confidence test of ``--method mipp``.

``--method mipp`` (issue 4; Westphal, Hailes and Musolesi [1]_) keeps the channels of layer ``l`` that layer ``l+1``
needs. Both measures here answer one question for a set ``R`` of masked channels: how much of what ``X_l`` tells
about ``X_{l+1}`` is lost, estimated ``K`` times on ``K`` folds of the calibration images, so that a test can say
how confident one is that the loss is real.

* **Prediction** (:class:`RidgeFit`): the information ``X_l`` carries about ``X_{l+1}`` is read from how well a
  predictor reconstructs ``X_{l+1}`` from ``X_l``; removing channels costs information exactly when the re-fitted
  predictor cannot reach the loss of the one that sees them (the loss drop of Covert et al. [2]_: for an optimal
  predictor under a Gaussian log-loss it is ``½ log(L_R / L_∅)`` nats per output). The predictor is linear in a
  design row ``[1, z, x]`` (a constant, conditioning columns, and the masked channels' columns), fitted by ridge
  least squares on ``K - 1`` folds and scored by its held-out fraction of variance unexplained on the ``K``-th. All
  of it is closed form on Gram matrices, so a re-fit after masking a block ``J`` of columns is a rank-``|J|``
  downdate of the inverse (:func:`removal_loss`, :func:`remove`), exact and warm-started by construction.
* **Matrix-based Rényi information** (:func:`renyi_weights`, :func:`renyi_information`): ``I_2(X_S; Y | Z)`` from
  kernel matrices (Sanchez Giraldo et al. [3]_, Yu et al. [4]_), a set of channels being the Hadamard product of
  their kernels; repeats are the ``K`` leave-one-fold-out subsamples, and every candidate costs one matrix product.
* **The decision** (:func:`corrected_t`, :func:`jackknife_t`, :func:`student_t_cdf`): the ``K`` paired differences
  ``Δ_f`` (loss with the candidate masked minus the reference) give a t statistic with ``K - 1`` degrees of freedom;
  the confidence that masking raises the loss is ``F_{K-1}(t)``.

References
----------
.. [1] C. Westphal, S. Hailes and M. Musolesi, "Mutual Information Preserving Neural Network Pruning",
   arXiv:2411.00147, 2024.
.. [2] I. Covert, S. Lundberg and S.-I. Lee, "Understanding Global Feature Contributions With Additive Importance
   Measures", NeurIPS 2020 (arXiv:2004.00668), section 3 (the loss drop of the optimal model is the mutual
   information for the cross-entropy loss, and the conditional variance for the squared error).
.. [3] L. G. Sanchez Giraldo, M. Rao and J. C. Principe, "Measures of entropy from data using infinitely divisible
   kernels", IEEE Trans. Inf. Theory 61(1):535-548, 2015.
.. [4] S. Yu, L. G. Sanchez Giraldo, R. Jenssen and J. C. Principe, "Multivariate extension of matrix-based Rényi's
   α-order entropy functional", IEEE Trans. PAMI 42(11):2960-2966, 2020.
.. [5] C. Nadeau and Y. Bengio, "Inference for the Generalization Error", Machine Learning 52:239-281, 2003.
.. [6] B. Efron and C. Stein, "The jackknife estimate of variance", Annals of Statistics 9(3):586-596, 1981.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "RidgeFit",
    "confidence_threshold",
    "corrected_t",
    "fit_ridge",
    "jackknife_t",
    "removal_loss",
    "remove",
    "renyi_information",
    "renyi_weights",
    "solo_losses",
    "student_t_cdf",
]


# ------------------------------------------------------------------------------------------------- the test


def student_t_cdf(t: float, dof: int) -> float:
    """``P(T <= t)`` for Student's t with an integer number of degrees of freedom ``dof >= 1``.

    Closed form (Abramowitz and Stegun 26.7.3-4): with ``θ = atan(t / √ν)``, ``A = P(|T| <= |t|)`` is
    ``(2/π)(θ + sinθ Σ_{j=0}^{(ν-3)/2} a_j cos^{2j+1}θ)`` for odd ν (``a_0 = 1``, ``a_j = a_{j-1}·2j/(2j+1)``) and
    ``sinθ Σ_{j=0}^{(ν-2)/2} b_j cos^{2j}θ`` for even ν (``b_0 = 1``, ``b_j = b_{j-1}(2j-1)/(2j)``); then
    ``F(t) = (1 + sign(t) A) / 2``.
    """
    if dof < 1 or int(dof) != dof:
        raise ValueError(f"dof must be a positive integer; got {dof}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    if dof % 2:
        total, term = 0.0, c
        for j in range((dof - 1) // 2):
            total += term
            term *= c * c * (2 * j + 2) / (2 * j + 3)
        a = 2 / math.pi * (theta + s * total) if dof > 1 else 2 * theta / math.pi
    else:
        total, term = 0.0, 1.0
        for j in range(dof // 2):
            total += term
            term *= c * c * (2 * j + 1) / (2 * j + 2)
        a = s * total
    return 0.5 * (1.0 + math.copysign(min(a, 1.0), t))


def confidence_threshold(confidence: float, dof: int) -> float:
    """The ``t`` with ``student_t_cdf(t, dof) = confidence`` (bisection; ``confidence`` in ``[0.5, 1)``)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must lie in [0.5, 1); got {confidence}")
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, dof) < confidence:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, dof) < confidence else (lo, mid)
        if hi - lo <= 1e-12 * max(hi, 1.0):
            break
    return (lo + hi) / 2


def _t(mean: torch.Tensor, se: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``mean / se``; a difference that is zero to rounding (a masked column that never varies) has ``t = 0``, and
    one with no spread gets ``±inf`` (the data cannot doubt it)."""
    tiny = 1e-12 * scale.clamp_min(1e-300)
    flat = mean.abs() <= tiny
    t = mean / se.clamp_min(1e-300)
    t = torch.where(se <= tiny, torch.sign(mean) * torch.inf, t)
    return torch.where(flat, torch.zeros_like(t), t)


def corrected_t(deltas: torch.Tensor, *, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Corrected resampled t statistic of ``K``-fold cross-validated paired differences, over the last dimension.

    ``t = Δ̄ / sqrt((1/K + n_test/n_train) s²)`` with ``s²`` the sample variance of the ``K`` differences and
    ``n_test/n_train = 1/(K-1)`` for ``K`` folds: the folds' training sets overlap, so the plain ``s²/K`` would
    understate the variance (Nadeau and Bengio [5]_). Compare with Student's t at ``K - 1`` degrees of freedom.
    ``scale`` (the size of the losses compared) tells a zero difference from rounding.
    """
    k = deltas.shape[-1]
    if k < 2:
        raise ValueError("the test needs at least 2 repeats")
    var = deltas.var(dim=-1, unbiased=True)
    se = (var * (1.0 / k + 1.0 / (k - 1))).sqrt()
    return _t(deltas.mean(dim=-1), se, torch.as_tensor(scale, dtype=deltas.dtype))


def jackknife_t(deltas: torch.Tensor, *, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """t statistic of a statistic estimated on the ``K`` delete-one-fold subsamples, over the last dimension.

    ``t = Δ̄ / sqrt((K-1)/K · Σ_f (Δ_f - Δ̄)²)``, the delete-a-group jackknife variance (Efron and Stein [6]_), which
    accounts for each subsample sharing ``(K-2)/(K-1)`` of its images with every other.
    """
    k = deltas.shape[-1]
    if k < 2:
        raise ValueError("the test needs at least 2 repeats")
    mean = deltas.mean(dim=-1)
    se = ((k - 1) / k * (deltas - mean[..., None]).square().sum(dim=-1)).sqrt()
    return _t(mean, se, torch.as_tensor(scale, dtype=deltas.dtype))


# ------------------------------------------------------------------------------------------------ prediction


@dataclass
class RidgeFit:
    """The cross-fitted ridge predictor of one problem over the columns still present, ``K`` folds batched.

    For fold ``f`` with training Gram ``G`` (all folds but ``f``, plus the ridge) and held-out Gram ``H``:
    ``p = G⁻¹``, ``beta = p b`` (``b = Xᵀ Y`` of the training folds), ``u = p c`` (``c = Xᵀ Y`` held out),
    ``v = p H beta``, ``w = p H p``, ``sse`` the held-out squared error and ``sst`` the held-out total sum of squares
    about the fold's mean. Removed columns are dropped from the matrices; ``index`` maps each original design column
    to its current row (``-1`` once removed).
    """

    p: torch.Tensor  # (K, D, D)
    w: torch.Tensor  # (K, D, D)
    beta: torch.Tensor  # (K, D, T)
    u: torch.Tensor  # (K, D, T)
    v: torch.Tensor  # (K, D, T)
    sse: torch.Tensor  # (K,)
    sst: torch.Tensor  # (K,)
    index: torch.Tensor  # (D0,)

    @property
    def loss(self) -> torch.Tensor:
        """Held-out fraction of variance unexplained, ``sse / sst``, per fold."""
        return self.sse / self.sst


def _ridge_matrix(gram: torch.Tensor, unpenalised: int, ridge: float) -> torch.Tensor:
    """``λ·diag(0, .., 0, 1, .., 1)`` with ``λ = ridge · mean(diag G)`` over the penalised columns."""
    d = gram.shape[-1]
    diag = gram.diagonal(dim1=-2, dim2=-1)[..., unpenalised:]
    if diag.shape[-1] == 0:
        return torch.zeros_like(gram)
    lam = ridge * diag.mean(dim=-1).clamp_min(1e-12)
    mask = torch.ones(d, dtype=gram.dtype, device=gram.device)
    mask[:unpenalised] = 0
    return torch.diag_embed(lam[..., None] * mask)


def _spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric positive definite matrices (batched) through their Cholesky factor."""
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


def _sym(a: torch.Tensor) -> torch.Tensor:
    return (a + a.transpose(-1, -2)) / 2


def _sst(yy: torch.Tensor, ysum: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return (yy - ysum.square().sum(-1) / n).clamp_min(1e-300)


def fit_ridge(folds: torch.Tensor, design: torch.Tensor, target: torch.Tensor, *, ridge: float,
              unpenalised: int = 1) -> RidgeFit:
    """Fit the cross-fitted ridge predictor of ``target`` columns from ``design`` columns.

    Parameters
    ----------
    folds : torch.Tensor
        Per-fold Gram matrices ``(K, M, M)`` of the row vectors ``[1, z, x, y]`` (column 0 must be the constant, so
        that ``folds[f, 0, 0]`` is the fold's row count and ``folds[f, 0, target]`` its target sums).
    design, target : torch.Tensor
        Column indices of the predictor's inputs (starting with the constant) and of the targets.
    ridge : float
        ``λ`` relative to the mean diagonal of the penalised design columns (all but the first ``unpenalised``).

    Notes
    -----
    Fold ``f`` is held out; its training Gram is ``Σ_{g≠f} G_g``. With ``β = (A + Λ)⁻¹ b`` the held-out squared
    error is ``sse = tr(Yᵀ Y) - 2⟨β, c⟩ + ⟨β, H β⟩`` (``c = Xᵀ Y``, ``H = Xᵀ X`` held out), so nothing but Gram
    matrices is ever needed.
    """
    folds = folds.double()
    train = folds.sum(0, keepdim=True) - folds
    a = train[:, design[:, None], design[None, :]]
    p = _sym(_spd_inverse(a + _ridge_matrix(a, unpenalised, ridge)))
    h = folds[:, design[:, None], design[None, :]]
    b = train[:, design[:, None], target[None, :]]
    c = folds[:, design[:, None], target[None, :]]
    beta = p @ b
    w = _sym(p @ h @ p)
    yy = folds[:, target, target].sum(-1)
    sse = yy - 2 * (beta * c).sum((-2, -1)) + (beta * (h @ beta)).sum((-2, -1))
    sst = _sst(yy, folds[:, 0, target], folds[:, 0, 0])
    index = torch.arange(design.numel(), device=p.device)
    return RidgeFit(p=p, w=w, beta=beta, u=p @ c, v=w @ b, sse=sse, sst=sst, index=index)


def removal_loss(fit: RidgeFit, cols: torch.Tensor) -> torch.Tensor:
    """Held-out loss per fold after removing column sets ``cols`` ``(B, j)`` from ``fit`` and re-fitting: ``(B, K)``.

    ``cols`` are original design columns still present. Removing columns ``J`` from a ridge fit with inverse ``p``
    gives ``β' = β - p_{·J} m`` with ``m = p_{JJ}⁻¹ β_J`` (the block-inverse downdate), hence
    ``sse' = sse + 2 tr(mᵀ(u_J - v_J)) + tr(mᵀ w_{JJ} m)``: an exact re-fit at the cost of a ``|J|``-sized solve.
    """
    idx = fit.index[cols.to(fit.index.device)]
    pjj = fit.p[:, idx[:, :, None], idx[:, None, :]]  # (K, B, j, j)
    m = torch.cholesky_solve(fit.beta[:, idx], torch.linalg.cholesky(pjj))
    wjj = fit.w[:, idx[:, :, None], idx[:, None, :]]
    diff = fit.u[:, idx] - fit.v[:, idx]
    sse = fit.sse[:, None] + 2 * (m * diff).sum((-2, -1)) + (m * (wjj @ m)).sum((-2, -1))
    return (sse / fit.sst[:, None]).transpose(0, 1)


def remove(fit: RidgeFit, cols: torch.Tensor) -> RidgeFit:
    """``fit`` with the original design columns ``cols`` ``(j,)`` removed for good (rank-``j`` downdate).

    With ``k = p_{·J} p_{JJ}⁻¹`` and ``m = p_{JJ}⁻¹ β_J``, on the remaining rows ``R``: ``p' = p_{RR} - k_R p_{JR}``,
    ``β' = β_R - k_R β_J``, ``u' = u_R - k_R u_J``, ``v' = v_R - w_{RJ} m - k_R v_J + k_R w_{JJ} m`` and
    ``w' = w_{RR} - k_R w_{JR} - w_{RJ} k_Rᵀ + k_R w_{JJ} k_Rᵀ``; the matrices shrink to ``R``.
    """
    j = fit.index[cols.to(fit.index.device)]
    keep = torch.ones(fit.p.shape[-1], dtype=torch.bool, device=j.device)
    keep[j] = False
    r = torch.nonzero(keep).flatten()
    pjj_inv = _spd_inverse(fit.p[:, j[:, None], j[None, :]])
    k = fit.p[:, r[:, None], j[None, :]] @ pjj_inv  # (K, R, j)
    m = pjj_inv @ fit.beta[:, j]
    wjj = fit.w[:, j[:, None], j[None, :]]
    w_rj = fit.w[:, r[:, None], j[None, :]]
    sse = fit.sse + 2 * (m * (fit.u[:, j] - fit.v[:, j])).sum((-2, -1)) + (m * (wjj @ m)).sum((-2, -1))
    kt = k.transpose(-1, -2)
    p = fit.p[:, r[:, None], r[None, :]] - k @ fit.p[:, j[:, None], r[None, :]]
    w = fit.w[:, r[:, None], r[None, :]] - k @ w_rj.transpose(-1, -2) - w_rj @ kt + k @ wjj @ kt
    beta = fit.beta[:, r] - k @ fit.beta[:, j]
    u = fit.u[:, r] - k @ fit.u[:, j]
    v = fit.v[:, r] - w_rj @ m - k @ fit.v[:, j] + k @ (wjj @ m)
    remap = torch.full_like(keep, -1, dtype=torch.long)
    remap[r] = torch.arange(r.numel(), device=r.device)
    index = torch.where(fit.index >= 0, remap[fit.index.clamp_min(0)], -1)
    return RidgeFit(p=p, w=w, beta=beta, u=u, v=v, sse=sse, sst=fit.sst, index=index)


def solo_losses(folds: torch.Tensor, base: torch.Tensor, channels: torch.Tensor, target: torch.Tensor, *,
                ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out losses of the base predictor (``base`` columns) and of base + each channel alone.

    ``channels`` is ``(C, g)``: the ``g`` columns of each channel. Returns ``(K,)`` for the base and ``(C, K)``;
    their difference is each channel's own information about the target given the base (conditioning) columns.
    """
    folds = folds.double()
    train = folds.sum(0, keepdim=True) - folds
    n_ch = channels.shape[0]
    cols = torch.cat((base[None, :].expand(n_ch, -1), channels), dim=1)  # (C, d)
    yy = folds[:, target, target].sum(-1)
    sst = _sst(yy, folds[:, 0, target], folds[:, 0, 0])

    def losses(index: torch.Tensor) -> torch.Tensor:  # index (B, d) -> (B, K)
        a = train[:, index[:, :, None], index[:, None, :]]  # (K, B, d, d)
        a = a + _ridge_matrix(a, 1, ridge)
        b = train[:, index[:, :, None], target[None, None, :]]
        beta = torch.cholesky_solve(b, torch.linalg.cholesky(a))
        h = folds[:, index[:, :, None], index[:, None, :]]
        c = folds[:, index[:, :, None], target[None, None, :]]
        sse = yy[:, None] - 2 * (beta * c).sum((-2, -1)) + (beta * (h @ beta)).sum((-2, -1))
        return (sse / sst[:, None]).transpose(0, 1)

    return losses(base[None, :])[0], losses(cols)


# ------------------------------------------------------------------------------------------------ Rényi


def renyi_weights(log_y: torch.Tensor, log_z: torch.Tensor | None, inside: torch.Tensor) -> torch.Tensor:
    """Weights ``(N², 2K)`` that turn a set's squared kernel into its ``I_2`` with the target on ``K`` subsamples.

    For unit-diagonal kernels (``K_ii = 1``: Gaussian kernels and their Hadamard products) on a subsample of ``n``
    images, ``S_2(M) = -log2(Σ_ij M_ij² / n²)`` [3]_, so
    ``I_2(X; Y | Z) = S(X∘Z) + S(Y∘Z) - S(X∘Y∘Z) - S(Z) = log2(a_2 / a_1) + S(Y∘Z) - S(Z)`` with
    ``a_1 = Σ_ij X_ij² Z_ij²`` and ``a_2 = Σ_ij X_ij² Y_ij² Z_ij²`` over the subsample (without ``Z``: ``a_1 = Σ X²``,
    ``a_2 = Σ X² Y²`` and the constant ``S(Y)``) [4]_. Column ``2f`` holds ``Z²`` and column ``2f + 1`` ``(Y∘Z)²``,
    masked to subsample ``f`` (``inside[f]``, a 0/1 vector over the ``N`` images).
    """
    log_w = 2 * log_y if log_z is None else 2 * (log_y + log_z)
    w1 = torch.ones_like(log_y) if log_z is None else torch.exp(2 * log_z)
    w2 = torch.exp(log_w)
    masks = inside[:, :, None] * inside[:, None, :]  # (K, N, N)
    return torch.stack((w1 * masks, w2 * masks), dim=1).flatten(2).flatten(0, 1).T  # (N², 2K)


def renyi_information(log_x2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log2(a_2 / a_1)`` per subsample for sets with squared log-kernels ``log_x2`` ``(B, N, N)``: ``(B, K)``.

    This is ``I_2(X; Y | Z)`` up to a constant per subsample (:func:`renyi_weights`), so differences between sets
    are information differences in bits; every candidate costs one ``(B, N²) @ (N², 2K)`` product.
    """
    sums = torch.exp(log_x2).flatten(1) @ weights  # (B, 2K)
    a1, a2 = sums[:, 0::2], sums[:, 1::2]
    return torch.log2(a2 / a1)
