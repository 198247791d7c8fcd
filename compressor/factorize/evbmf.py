"""Rank selection from singular values: empirical variational Bayesian MF (EVBMF) and an energy threshold.

Both are pure functions of a matrix or of its singular values; :mod:`compressor.factorize.tucker2` applies them to
the mode-0 and mode-1 unfoldings of a convolution kernel, as Kim et al. (ICLR 2016) do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compressor.errors import InputError

__all__ = ["EVBMFResult", "energy_rank", "evb_tau_threshold", "evbmf", "golden_section_minimize"]

# Grid points (log-spaced over the admissible interval) scanned before the golden-section refinement of sigma^2.
_SIGMA2_GRID = 64


@dataclass(frozen=True)
class EVBMFResult:
    """Empirical VB matrix factorisation of one matrix.

    Attributes
    ----------
    rank : int
        Number of singular components the EVB solution keeps (``0 <= rank <= H``).
    singular_values : torch.Tensor
        Posterior (shrunk) singular values ``gamma_hat_h`` of the kept components, descending, shape ``(rank,)``,
        float64 on the CPU.
    sigma2 : float
        Noise variance: the value given, or the empirical-Bayes estimate.
    threshold : float
        EVB truncation threshold ``gamma_evb`` on the observed singular values for this ``sigma2``.
    """

    rank: int
    singular_values: torch.Tensor
    sigma2: float
    threshold: float


def evb_tau_threshold(alpha: float) -> float:
    r"""Return :math:`\underline{\tau}(\alpha)`, the zero of :math:`\Xi(\tau;\alpha)=\Phi(\tau)+\Phi(\tau/\alpha)`.

    Parameters
    ----------
    alpha : float
        Aspect ratio :math:`\alpha = L/M \in (0, 1]`.

    Returns
    -------
    float
        The unique zero-crossing of the decreasing function :math:`\Xi`, with
        :math:`\Phi(z) = \log(z + 1)/z - 1/2`, found by bisection to machine precision.

    Notes
    -----
    :math:`\Phi` decreases from :math:`1/2` (:math:`z \to 0`) to :math:`-1/2` (:math:`z \to \infty`), so :math:`\Xi`
    has exactly one root. For :math:`\alpha = 1` it solves :math:`\log(1+\tau) = \tau/2`, i.e.
    :math:`\underline{\tau} = 2.5129\ldots`; the VBMF code of Kim et al. uses :math:`2.5129\sqrt{\alpha}` for every
    :math:`\alpha`, which is exact only at :math:`\alpha = 1` and slightly low below it.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")

    def xi(tau: float) -> float:
        return math.log1p(tau) / tau + alpha * math.log1p(tau / alpha) / tau - 1.0

    lo, hi = 1e-12, 1.0
    while xi(hi) > 0.0:  # Xi -> -1 as tau -> inf, so this terminates
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if xi(mid) > 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def golden_section_minimize(func: Callable[[float], float], lo: float, hi: float, *, tol: float = 1e-10) -> float:
    """Minimise a unimodal scalar function on ``[lo, hi]`` by golden-section search.

    Parameters
    ----------
    func : callable
        ``f(x) -> float``.
    lo, hi : float
        Bracket, ``lo <= hi``.
    tol : float
        Stop when the bracket is shorter than ``tol * (|lo| + |hi|)`` (relative).

    Returns
    -------
    float
        The abscissa of the smallest value seen (the bracket ends included).

    Notes
    -----
    Each step shrinks the bracket by :math:`1/\\varphi \\approx 0.618` and reuses one interior evaluation. On a
    function that is not unimodal it returns a local minimum inside the bracket.
    """
    if lo > hi:
        raise ValueError(f"empty bracket [{lo}, {hi}]")
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = func(c), func(d)
    for _ in range(400):
        if b - a <= tol * (abs(a) + abs(b)) or b - a == 0.0:
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = func(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = func(d)
    candidates = [(fc, c), (fd, d), (func(lo), lo), (func(hi), hi)]
    return min(candidates)[1]


def _evb_tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """Larger root ``tau`` of ``x = (1 + tau)(1 + alpha/tau)`` (valid for ``x >= (1 + sqrt(alpha))**2``)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _sigma2_objective(sigma2: float, gamma2: np.ndarray, *, m: int, h: int, alpha: float, x_bar: float) -> float:
    """Objective whose minimiser is the EVB noise variance (up to constants independent of ``sigma2``)."""
    x = gamma2 / (m * sigma2)
    # psi0(x) = x - log x; the -log(gamma_h^2 / M) part is constant in sigma2 and dropped, which also keeps exact
    # zero singular values finite.
    value = float(np.sum(x) + x.size * math.log(sigma2))
    z = x[:h][x[:h] > x_bar]
    if z.size:
        tau = _evb_tau(z, alpha)
        value += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
    return value


def _estimate_sigma2(gamma2: np.ndarray, *, L: int, m: int, h: int, alpha: float, x_bar: float) -> float:
    """Minimise the EVB objective over ``[sigma2_lower, sigma2_upper]``: log-grid scan, then golden section."""
    upper = float(np.sum(gamma2)) / (L * m)
    e_h = min(math.ceil(L / (1.0 + alpha)) - 1, h)
    lower = max(float(gamma2[e_h]) / (m * x_bar), float(np.mean(gamma2[e_h:])) / m)
    lower = min(max(lower, upper * 1e-12), upper)

    def objective(log_s2: float) -> float:
        return _sigma2_objective(math.exp(log_s2), gamma2, m=m, h=h, alpha=alpha, x_bar=x_bar)

    a, b = math.log(lower), math.log(upper)
    if b - a < 1e-12:
        return upper
    # The objective can have several local minima between the bounds (one per singular value crossing the
    # threshold): scan a grid, then refine inside the cell around the best grid point.
    grid = np.linspace(a, b, _SIGMA2_GRID)
    best = int(np.argmin([objective(g) for g in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, _SIGMA2_GRID - 1)]
    return math.exp(golden_section_minimize(objective, float(lo), float(hi), tol=1e-12))


def evbmf(
    y: torch.Tensor, /, *, sigma2: float | None = None, H: int | None = None  # noqa: N803 (the paper's H)
) -> EVBMFResult:
    r"""Global analytic empirical variational Bayesian matrix factorisation (Nakajima et al., 2013).

    Model: :math:`Y = BA^\top + E` with :math:`Y \in \mathbb{R}^{L \times M}`, :math:`L \le M` (``y`` is transposed
    internally otherwise), Gaussian noise of variance :math:`\sigma^2`, Gaussian priors on the columns of :math:`A`
    and :math:`B` whose variances are learned (empirical Bayes). The solution is a shrinkage of the SVD
    :math:`Y = \sum_h \gamma_h \omega_{b_h} \omega_{a_h}^\top`, component by component.

    Parameters
    ----------
    y : torch.Tensor
        Matrix, shape ``(L, M)``. Computed in float64.
    sigma2 : float, optional
        Noise variance; estimated by empirical Bayes (see Notes) when ``None``.
    H : int, optional
        Largest rank considered, ``1 <= H <= min(L, M)``; defaults to ``min(L, M)``.

    Returns
    -------
    EVBMFResult
        Rank, posterior singular values, ``sigma2`` and the threshold.

    Notes
    -----
    With :math:`\alpha = L/M` and :math:`\underline{\tau}` the zero of
    :math:`\Xi(\tau;\alpha) = \Phi(\tau) + \Phi(\tau/\alpha)`, :math:`\Phi(z) = \log(z+1)/z - 1/2`
    (:func:`evb_tau_threshold`), the EVB estimator keeps component :math:`h` iff
    :math:`\gamma_h \ge \underline{\gamma}^{EVB}` with

    .. math::

        \underline{\gamma}^{EVB} = \sigma \sqrt{M (1 + \underline{\tau})(1 + \alpha/\underline{\tau})}
                                 = \sigma \sqrt{M \underline{x}},

    and shrinks it to

    .. math::

        \hat\gamma_h^{EVB} = \frac{\gamma_h}{2}\left(1 - \frac{(L+M)\sigma^2}{\gamma_h^2}
            + \sqrt{\left(1 - \frac{(L+M)\sigma^2}{\gamma_h^2}\right)^2 - \frac{4 L M \sigma^4}{\gamma_h^4}}\right).

    Unknown :math:`\sigma^2` minimises the free energy, which in :math:`x_h = \gamma_h^2/(M\sigma^2)` reads
    (Nakajima et al., 2015, up to constants)

    .. math::

        \Omega(\sigma^2) = \sum_{h=1}^{H} \psi(x_h) + \sum_{h=H+1}^{L} \psi_0(x_h), \quad
        \psi_0(x) = x - \log x, \quad \psi(x) = \psi_0(x) + \theta(x > \underline{x})\,\psi_1(x),

        \psi_1(x) = \log(\tau(x) + 1) + \alpha \log(\tau(x)/\alpha + 1) - \tau(x), \quad
        \tau(x) = \tfrac12\left(x - (1+\alpha) + \sqrt{(x - (1+\alpha))^2 - 4\alpha}\right),

    over :math:`[\underline{\sigma}^2, \bar\sigma^2]` with :math:`\bar\sigma^2 = \sum_{h=1}^{L} \gamma_h^2 / (LM)`,
    :math:`\underline{\sigma}^2 = \max\left(\gamma_{\bar H+1}^2/(M\underline{x}),
    \sum_{h>\bar H}\gamma_h^2/(M(L-\bar H))\right)` and :math:`\bar H = \min(\lceil L/(1+\alpha)\rceil - 1, H)`.
    Since :math:`\Omega` may have several local minima, a 64-point log-grid scan precedes a golden-section
    refinement (the reference code runs a bounded Brent search from the middle of the interval).

    References
    ----------
    S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic solution of fully-observed variational
    Bayesian matrix factorization", JMLR 14 (2013) 1-37.
    S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Condition for perfect dimensionality recovery by
    variational Bayesian PCA", JMLR 16 (2015).
    Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang, D. Shin, "Compression of deep convolutional neural networks for
    fast and low power mobile applications", ICLR 2016 (EVBMF on the kernel unfoldings).
    """
    y = torch.as_tensor(y).detach().to(device="cpu", dtype=torch.float64)
    if y.ndim != 2 or min(y.shape) == 0:
        raise ValueError(f"evbmf needs a non-empty 2-D matrix, got shape {tuple(y.shape)}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, m = y.shape
    h = L if H is None else H
    if not 1 <= h <= L:
        raise ValueError(f"H must be in [1, {L}] for a {L}x{m} matrix, got {h}")
    if sigma2 is not None and not sigma2 > 0.0:
        raise ValueError(f"sigma2 must be positive, got {sigma2}")
    gamma = torch.linalg.svdvals(y).numpy()
    gamma2 = gamma * gamma
    alpha = L / m
    tau_bar = evb_tau_threshold(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    if sigma2 is None:
        if not np.any(gamma2 > 0.0):
            return EVBMFResult(
                rank=0, singular_values=torch.zeros(0, dtype=torch.float64), sigma2=0.0, threshold=0.0
            )
        sigma2 = _estimate_sigma2(gamma2, L=L, m=m, h=h, alpha=alpha, x_bar=x_bar)
    threshold = math.sqrt(m * sigma2 * x_bar)
    kept = gamma[:h][gamma[:h] >= threshold]
    shrink = 1.0 - (L + m) * sigma2 / kept**2
    posterior = 0.5 * kept * (shrink + np.sqrt(np.maximum(shrink**2 - 4.0 * L * m * sigma2**2 / kept**4, 0.0)))
    return EVBMFResult(
        rank=int(kept.size), singular_values=torch.from_numpy(posterior.copy()), sigma2=float(sigma2),
        threshold=threshold,
    )


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    r"""Smallest rank keeping a fraction ``energy`` of the spectral energy.

    Parameters
    ----------
    singular_values : torch.Tensor
        1-D, non-negative, in any order (sorted descending here).
    energy : float
        Fraction in ``(0, 1]``.

    Returns
    -------
    int
        Smallest :math:`r` with :math:`\sum_{i \le r} \sigma_i^2 \ge \text{energy} \cdot \sum_i \sigma_i^2`
        (singular values sorted descending); ``0`` when every singular value is zero or there are none.
    """
    if not 0.0 < energy <= 1.0:
        raise InputError(f"energy must be a fraction in (0, 1], got {energy}")
    s = torch.as_tensor(singular_values).detach().to(device="cpu", dtype=torch.float64)
    if s.ndim != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(s.shape)}")
    if bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("singular_values must be finite and non-negative")
    cumulative = torch.cumsum(torch.sort(s, descending=True).values ** 2, dim=0)
    if s.numel() == 0 or cumulative[-1] == 0:
        return 0
    # Compare with the cumulative total itself (not a separately summed one) so energy=1 is reached exactly.
    return int(torch.searchsorted(cumulative, energy * cumulative[-1], side="left").item()) + 1
