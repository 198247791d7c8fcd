"""Tucker-2 factorisation of a convolution into three plain convolutions, with costs and rank selection.

A kernel :math:`W \\in \\mathbb{R}^{C_{out} \\times C_{in} \\times k_h \\times k_w}` is approximated along its two
channel modes only (Kim et al., ICLR 2016):

.. math::

    W \\approx \\mathcal{G} \\times_0 U_{out} \\times_1 U_{in}, \\qquad
    W_{o,i,:,:} \\approx \\sum_{a,b} (U_{out})_{o,a} (U_{in})_{i,b}\\, \\mathcal{G}_{a,b,:,:},

with :math:`\\mathcal{G} \\in \\mathbb{R}^{r_{out} \\times r_{in} \\times k_h \\times k_w}` and orthonormal-column
factors, which runs as 1x1 (:math:`U_{in}^\\top`) -> kxk (:math:`\\mathcal{G}`) -> 1x1 (:math:`U_{out}`). Channel
mixing commutes with per-channel spatial padding, so only the core needs the original stride, padding and dilation.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from torch import nn

from compressor.errors import InputError, PruningError
from compressor.factorize.evbmf import energy_rank, evbmf

__all__ = [
    "ConvShape", "Cost", "RankAllocation", "Tucker2Factors", "allocate_ranks_for_target", "conv_cost",
    "factorize_conv", "select_ranks", "tucker2_cost", "tucker2_decompose", "tucker2_shrinks",
]

# HOOI settings: the SVD initialisation is deterministic; random_state only seeds tensorly's padding of a factor
# whose rank exceeds the rank of its unfolding (tensorly.decomposition._tucker._complete_factor).
_HOOI_ITERS, _HOOI_TOL, _HOOI_SEED = 100, 1e-7, 0
_BISECTION_STEPS = 60


class Cost(NamedTuple):
    """Parameters and multiply-accumulates of a layer (MACs: one per weight per output position, bias excluded)."""

    params: int
    macs: int


@dataclass(frozen=True)
class Tucker2Factors:
    """``weight ~= core x_0 u_out x_1 u_in``: core ``(r_out, r_in, kh, kw)``, ``u_out (C_out, r_out)``,
    ``u_in (C_in, r_in)``; factors with orthonormal columns (identity on a mode kept at full rank)."""

    core: torch.Tensor
    u_out: torch.Tensor
    u_in: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        """The approximated kernel, shape ``(C_out, C_in, kh, kw)``."""
        return torch.einsum("oa,ib,abhw->oihw", self.u_out, self.u_in, self.core)


@dataclass(frozen=True)
class ConvShape:
    """Geometry of one groups=1 ``Conv2d`` at a given input size: what the cost formulas need.

    ``in_hw`` is the spatial size of the input, ``out_hw`` of the output (after stride, padding, dilation).
    """

    c_in: int
    c_out: int
    kernel: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    bias: bool

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_hw: tuple[int, int]) -> ConvShape:
        """Read channels, kernel and bias from ``conv`` and compute the output size for an ``in_hw`` input."""
        _check_eligible(conv)
        if conv.padding == "same":  # torch allows 'same' only with stride 1: the size is kept
            out = tuple(in_hw)
        else:
            pad = (0, 0) if isinstance(conv.padding, str) else conv.padding  # the only other str is 'valid'
            out = tuple(
                (in_hw[d] + 2 * pad[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1) // conv.stride[d] + 1
                for d in range(2)
            )
        return cls(
            c_in=conv.in_channels, c_out=conv.out_channels, kernel=tuple(conv.kernel_size),  # type: ignore[arg-type]
            in_hw=tuple(in_hw), out_hw=out, bias=conv.bias is not None,  # type: ignore[arg-type]
        )

    def dense_cost(self) -> Cost:
        """Cost of the original convolution (:func:`conv_cost`)."""
        return conv_cost(self.c_in, self.c_out, self.kernel, *self.out_hw, bias=self.bias)


def _check_eligible(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"only nn.Conv2d can be Tucker-2 factorised, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(
            f"only groups=1 convolutions are eligible for Tucker-2 factorisation, got groups={conv.groups} "
            f"({conv.in_channels}->{conv.out_channels}); grouped and depthwise convs are left as they are"
        )


def _kernel_pair(k: int | tuple[int, int]) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


def conv_cost(
    c_in: int, c_out: int, k: int | tuple[int, int], h_out: int, w_out: int, *, bias: bool
) -> Cost:
    """Parameters and MACs of a groups=1 convolution.

    ``params = C_out C_in k_h k_w (+ C_out)`` and ``MACs = H_out W_out C_out C_in k_h k_w``: one multiply-accumulate
    per weight per output position; bias additions and padding are not counted (the fvcore/thop convention).
    """
    kh, kw = _kernel_pair(k)
    weights = c_out * c_in * kh * kw
    return Cost(params=weights + (c_out if bias else 0), macs=h_out * w_out * weights)


def tucker2_cost(shape: ConvShape, *, rank_out: int, rank_in: int) -> Cost:
    """Parameters and MACs of the Tucker-2 replacement built by :func:`factorize_conv`.

    Notes
    -----
    With :math:`(H, W)` the input size and :math:`(H', W')` the output size:

    - 1x1 :math:`C_{in} \\to r_{in}`, dropped when :math:`r_{in} = C_{in}`: :math:`C_{in} r_{in}` params,
      :math:`H W C_{in} r_{in}` MACs (stride 1, so it runs at input resolution);
    - core :math:`r_{in} \\to r_{out}`, :math:`k_h k_w r_{in} r_{out}` params,
      :math:`H' W' k_h k_w r_{in} r_{out}` MACs (it carries the stride);
    - 1x1 :math:`r_{out} \\to C_{out}`, dropped when :math:`r_{out} = C_{out}`: :math:`r_{out} C_{out}` params,
      :math:`H' W' r_{out} C_{out}` MACs;
    - plus :math:`C_{out}` bias parameters when the original conv has a bias.
    """
    _check_ranks(shape.c_out, shape.c_in, rank_out, rank_in)
    (h, w), (ho, wo), (kh, kw) = shape.in_hw, shape.out_hw, shape.kernel
    params = kh * kw * rank_in * rank_out
    macs = ho * wo * params
    if rank_in < shape.c_in:
        params += shape.c_in * rank_in
        macs += h * w * shape.c_in * rank_in
    if rank_out < shape.c_out:
        params += rank_out * shape.c_out
        macs += ho * wo * rank_out * shape.c_out
    return Cost(params=params + (shape.c_out if shape.bias else 0), macs=macs)


def tucker2_shrinks(shape: ConvShape, *, rank_out: int, rank_in: int) -> bool:
    """True when the factorisation has strictly fewer parameters *and* strictly fewer MACs than the conv."""
    dense, factored = shape.dense_cost(), tucker2_cost(shape, rank_out=rank_out, rank_in=rank_in)
    return factored.params < dense.params and factored.macs < dense.macs


def _check_ranks(c_out: int, c_in: int, rank_out: int, rank_in: int) -> None:
    if not (1 <= rank_out <= c_out and 1 <= rank_in <= c_in):
        raise ValueError(
            f"ranks must satisfy 1 <= rank_out <= C_out={c_out} and 1 <= rank_in <= C_in={c_in}, "
            f"got rank_out={rank_out}, rank_in={rank_in}"
        )


def _partial_tucker(
    tensor: torch.Tensor, ranks: list[int], modes: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The one place that calls tensorly: scoped pytorch backend, fixed init, version-proof unpacking.

    tensorly >= 0.8 returns ``((core, factors), rec_errors)`` while older versions (and their tutorials) return
    ``(core, factors)``; the docstring of 0.10.0 still documents the old form.
    """
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # A rank above the rank of its unfolding is padded (deterministically, seeded) with orthonormal columns;
        # tensorly warns on every HOOI sweep about it.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        result = partial_tucker(
            tensor, rank=ranks, modes=modes, init="svd", n_iter_max=_HOOI_ITERS, tol=_HOOI_TOL,
            random_state=_HOOI_SEED,
        )
    decomposition = result if isinstance(result[0], torch.Tensor) else result[0]
    core, factors = decomposition
    return core, list(factors)


@torch.no_grad()
def tucker2_decompose(weight: torch.Tensor, *, rank_out: int, rank_in: int) -> Tucker2Factors:
    """Tucker-2 decomposition of a conv kernel on its output- and input-channel modes (HOOI, SVD init).

    Parameters
    ----------
    weight : torch.Tensor
        Kernel, shape ``(C_out, C_in, kh, kw)``; decomposed in float64 on its device.
    rank_out, rank_in : int
        Multilinear ranks, ``1 <= rank_out <= C_out`` and ``1 <= rank_in <= C_in``.

    Returns
    -------
    Tucker2Factors
        Float64 factors. A mode kept at full rank gets the identity factor (exact, and no random completion), so
        at full rank on both modes ``core`` is the kernel itself.

    References
    ----------
    T. G. Kolda, B. W. Bader, "Tensor decompositions and applications", SIAM Review 51 (2009) 455-500.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a (C_out, C_in, kh, kw) conv kernel, got shape {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    _check_ranks(c_out, c_in, rank_out, rank_in)
    w = weight.detach().to(torch.float64)
    eye = {0: torch.eye(c_out, dtype=w.dtype, device=w.device), 1: torch.eye(c_in, dtype=w.dtype, device=w.device)}
    modes = [m for m, (r, c) in enumerate(((rank_out, c_out), (rank_in, c_in))) if r < c]
    if not modes:
        return Tucker2Factors(core=w.clone(), u_out=eye[0], u_in=eye[1])
    core, factors = _partial_tucker(w, [(rank_out, rank_in)[m] for m in modes], modes)
    found = dict(zip(modes, factors))
    return Tucker2Factors(core=core, u_out=found.get(0, eye[0]), u_in=found.get(1, eye[1]))


@torch.no_grad()
def factorize_conv(conv: nn.Conv2d, *, rank_out: int, rank_in: int) -> nn.Sequential:
    """Replace ``conv`` by up to three plain convolutions (the user's module is not modified).

    Returns ``nn.Sequential`` with children ``reduce`` (1x1 ``C_in -> r_in``, weight :math:`U_{in}^\\top`),
    ``core`` (kxk ``r_in -> r_out``, original stride, padding, dilation and padding mode, no bias) and ``restore``
    (1x1 ``r_out -> C_out``, weight :math:`U_{out}`, the original bias). ``reduce`` is dropped when
    ``rank_in == C_in`` and ``restore`` when ``rank_out == C_out``, their factor folded into the core (which then
    carries the bias when it is last). Weights take ``conv``'s dtype and device; ``requires_grad`` is kept.
    """
    _check_eligible(conv)
    factors = tucker2_decompose(conv.weight, rank_out=rank_out, rank_in=rank_in)
    core, u_out, u_in = factors.core, factors.u_out, factors.u_in
    keep_in, keep_out = rank_in < conv.in_channels, rank_out < conv.out_channels
    if not keep_in:
        core = torch.einsum("abhw,ib->aihw", core, u_in)
    if not keep_out:
        core = torch.einsum("oa,abhw->obhw", u_out, core)
    ref = conv.weight
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if keep_in:
        layers["reduce"] = _plain_conv(u_in.T[:, :, None, None], like=ref)
    layers["core"] = _plain_conv(
        core, like=ref, bias=None if keep_out else conv.bias, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, padding_mode=conv.padding_mode,
    )
    if keep_out:
        layers["restore"] = _plain_conv(u_out[:, :, None, None], like=ref, bias=conv.bias)
    block = nn.Sequential(layers)
    block.train(conv.training)
    return block


def _plain_conv(
    weight: torch.Tensor, *, like: torch.Tensor, bias: torch.Tensor | None = None, **conv_kwargs: object
) -> nn.Conv2d:
    c_out, c_in, kh, kw = weight.shape
    conv = nn.Conv2d(
        c_in, c_out, (kh, kw), bias=bias is not None, device=like.device, dtype=like.dtype,
        **conv_kwargs,  # type: ignore[arg-type]
    )
    conv.weight.copy_(weight.to(like.dtype))
    if bias is not None:
        assert conv.bias is not None  # built with bias=True just above
        conv.bias.copy_(bias.detach())
    conv.requires_grad_(like.requires_grad)
    return conv


def _unfoldings(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode-0 ``(C_out, C_in kh kw)`` and mode-1 ``(C_in, C_out kh kw)`` unfoldings, float64 on the CPU."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    return w.reshape(w.shape[0], -1), w.transpose(0, 1).reshape(w.shape[1], -1)


def select_ranks(
    weight: torch.Tensor, *, rule: Literal["evbmf", "energy"] = "evbmf", energy: float = 0.9
) -> tuple[int, int]:
    """Per-layer ``(rank_out, rank_in)`` from the mode-0 and mode-1 unfoldings of a conv kernel.

    ``rule="evbmf"`` takes the EVBMF rank of each unfolding (:func:`~compressor.factorize.evbmf.evbmf`, noise
    variance estimated), as Kim et al. (ICLR 2016); ``rule="energy"`` the smallest rank keeping ``energy`` of each
    unfolding's squared singular values (:func:`~compressor.factorize.evbmf.energy_rank`). Ranks are clipped to
    at least 1: EVBMF finds rank 0 on a kernel indistinguishable from noise, and a conv needs one channel.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a (C_out, C_in, kh, kw) conv kernel, got shape {tuple(weight.shape)}")
    ranks = []
    for unfolding in _unfoldings(weight):
        if rule == "evbmf":
            rank = evbmf(unfolding).rank
        elif rule == "energy":
            rank = energy_rank(torch.linalg.svdvals(unfolding), energy)
        else:
            raise InputError(f"unknown rank rule {rule!r}; choose 'evbmf' or 'energy' (or 'target' for a budget)")
        ranks.append(max(rank, 1))
    return ranks[0], ranks[1]


@dataclass(frozen=True)
class RankAllocation:
    """Result of :func:`allocate_ranks_for_target`.

    ``ranks`` maps each layer name to ``(rank_out, rank_in)``, or ``None`` where the original conv is kept (the
    factorisation would not lower both params and MACs). ``keep_energy`` is the shared energy fraction found,
    ``before``/``after`` the totals of ``metric`` and ``achieved = 1 - after / before`` the fraction removed.
    """

    ranks: Mapping[str, tuple[int, int] | None]
    keep_energy: float
    metric: Literal["params", "macs"]
    target: float
    before: int
    after: int
    achieved: float


def _ranks_at(spectra: tuple[torch.Tensor, torch.Tensor], shape: ConvShape, keep: float) -> tuple[int, int] | None:
    rank_out, rank_in = (max(energy_rank(s, keep), 1) for s in spectra)
    return (rank_out, rank_in) if tucker2_shrinks(shape, rank_out=rank_out, rank_in=rank_in) else None


def allocate_ranks_for_target(
    layers: Mapping[str, tuple[torch.Tensor, ConvShape]], *, target: float,
    metric: Literal["params", "macs"] = "params", total: int | None = None,
) -> RankAllocation:
    """Ranks for several convs so that factorising them removes a fraction ``target`` of ``metric``.

    Parameters
    ----------
    layers : Mapping[str, tuple[torch.Tensor, ConvShape]]
        Name -> (kernel, geometry) of each eligible (groups=1) conv.
    target : float
        Fraction of ``metric`` to remove, in the open interval (0, 1).
    metric : {"params", "macs"}
        What the target counts.
    total : int, optional
        Model-wide total of ``metric`` (the denominator, e.g. including the classifier and norms); defaults to the
        sum over ``layers``.

    Returns
    -------
    RankAllocation
        Per-layer ranks, the keep-energy found and the fraction actually removed (``achieved >= target``).

    Raises
    ------
    PruningError
        When even rank 1 on every mode of every shrinkable layer cannot remove ``target``.

    Notes
    -----
    One keep-fraction :math:`e \\in (0, 1]` of spectral energy is shared by all layers: layer :math:`l` gets
    :math:`r_{out}^l(e), r_{in}^l(e)`, the energy ranks of its mode-0 and mode-1 unfoldings, and is factorised only
    where that lowers both its params and MACs, otherwise it keeps its conv at cost :math:`D_l`. Each layer's cost
    :math:`c_l(e) = T_l(e)` while :math:`T_l(e) < D_l` (on both metrics), then :math:`D_l`; both branches are
    non-decreasing in :math:`e` and the switch happens once, so :math:`\\sum_l c_l(e)` is non-decreasing, and
    bisection finds the largest :math:`e` with :math:`\\text{total} - \\sum_l (D_l - c_l(e)) \\le (1 -
    \\text{target}) \\cdot \\text{total}`. Ranks are integers, so the cost is a step function: the removal
    achieved overshoots the target by at most one rank step of one layer (ties aside). Allocating by energy rather
    than by a common rank ratio keeps more rank where a layer's spectrum is spread out.
    """
    if not 0.0 < target < 1.0:
        raise InputError(f"target must be a fraction of {metric} to remove in the open interval (0, 1), got {target}")
    if metric not in ("params", "macs"):
        raise InputError(f"metric must be 'params' or 'macs', got {metric!r}")
    spectra, shapes = {}, {}
    for name, (weight, shape) in layers.items():
        if tuple(weight.shape) != (shape.c_out, shape.c_in, *shape.kernel):
            raise ValueError(f"layer {name!r}: kernel shape {tuple(weight.shape)} does not match {shape}")
        spectra[name] = tuple(torch.linalg.svdvals(u) for u in _unfoldings(weight))
        shapes[name] = shape
    dense = {name: getattr(shapes[name].dense_cost(), metric) for name in layers}
    before = sum(dense.values()) if total is None else total
    if before < sum(dense.values()):
        raise ValueError(f"total={total} is smaller than the layers' own {metric} ({sum(dense.values())})")

    def allocate(keep: float) -> tuple[dict[str, tuple[int, int] | None], int]:
        ranks = {name: _ranks_at(spectra[name], shapes[name], keep) for name in layers}
        saved = sum(
            dense[name] - getattr(tucker2_cost(shapes[name], rank_out=r[0], rank_in=r[1]), metric)
            for name, r in ranks.items() if r is not None
        )
        return ranks, before - saved

    budget = (1.0 - target) * before
    lo, hi = 1e-12, 1.0  # energy_rank(., 1e-12) is 1: the most aggressive allocation
    ranks, after = allocate(lo)
    if after > budget:
        raise PruningError(
            f"Tucker-2 factorisation cannot remove {target:.1%} of {metric}: rank 1 on every mode of the "
            f"{sum(r is not None for r in ranks.values())} layers that shrink removes only {1 - after / before:.1%} "
            f"(the rest is in layers that are not eligible or would not shrink); lower the target or prune first"
        )
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if allocate(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    ranks, after = allocate(lo)
    return RankAllocation(
        ranks=ranks, keep_energy=lo, metric=metric, target=target, before=before, after=after,
        achieved=1.0 - after / before,
    )
