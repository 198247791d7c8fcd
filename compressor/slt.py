"""Strong lottery tickets in a partially frozen random network (``compress slt``).

A *strong lottery ticket* (SLT) is a subnetwork of a randomly initialised network that is accurate without any weight
training. Edge-popup (Ramanujan et al., "What's hidden in a randomly weighted neural network?", CVPR 2020; reference
code allenai/hidden-networks) finds one by learning a score per weight and keeping, per layer, the top-scored
weights; the gradient of the 0/1 mask is passed straight through to the scores. Otsuka et al., "Partially frozen
random networks contain compact strong lottery tickets" (arXiv 2402.14029, first titled "Partial search in a frozen
network is enough to find a strong lottery ticket") *freeze* a random part of the weights before the search: some
are permanently pruned, some permanently kept (locked), and only the rest is searched. Random weights and the
freezing pattern are regenerated from seeds, so a ticket is stored as seeds plus one mask bit per *searched* weight
(and the BatchNorm statistics, the only floats that must be stored): ``1 / (1 - F)`` fewer mask bits than a ticket
found in the dense source.

Per layer ``l`` with ``N_l`` weights, keep ratio ``K_l`` (``--keep``; uniform, or ERK-distributed), freeze ratio
``F`` and pruned share ``P_l`` of the frozen part (``--freeze-prune``; default ``1 - K_l``, so the frozen part has
the ticket's own density):

.. math::
    n^{pruned}_l = \\mathrm{round}(N_l F P_l), \\quad n^{locked}_l = \\mathrm{round}(N_l F (1 - P_l)), \\quad
    n^{searched}_l = N_l - n^{pruned}_l - n^{locked}_l, \\quad
    k_l = \\mathrm{round}(N_l K_l) - n^{locked}_l \\in [0, n^{searched}_l]

and the ticket's mask is ``locked OR top-k_l(|score|) over the searched weights``. ``--freeze 0`` is the dense source
(plain edge-popup); ``--freeze-prune 1`` a randomly pruned source (Gadhikar et al., ICML 2023), whose search space has
the same size as a frozen network of the same ``F`` but can only hold tickets sparser than itself.

As in the reference: no weight ever trains (the random weights are buffers; the scores are the only parameters, so
the one :class:`~compressor.training.Trainer` trains exactly them), BatchNorm has no affine parameters, layers have no
bias (a bias is zero), the weights are Kaiming normal or signed constant with the fan scaled by the layer's keep
ratio ("scale_fan"), the scores start Kaiming uniform (``a = sqrt(5)``) and top-k is per layer.

Examples
--------
>>> from compressor.models import create_model
>>> cfg = SLTConfig(keep=0.5, freeze=0.7)
>>> net = make_slt(create_model("samplenet"), cfg)   # seeded random weights, frozen pattern, scores
>>> # Trainer(TrainConfig(epochs=...)).fit(net, loader) learns the scores; then:
>>> # compressor.slt_ticket.save_ticket(net, "ticket.slt", arch="samplenet"); load_slt("ticket.slt") rebuilds it
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .training import Callback, TrainState

__all__ = ["DISTRIBUTIONS", "FORMAT", "INITS", "LOCKED", "PRUNED", "SEARCHED", "LayerPlan", "MaskChurn", "SLTConfig",
           "SLTConv2d", "SLTLinear", "erk_densities", "iter_plan_rows", "layer_plans", "load_slt", "make_slt",
           "materialize", "plans_of", "slt_layers"]

FORMAT = "compressor.slt/1"
INITS = ("signed-constant", "kaiming-normal")
DISTRIBUTIONS = ("uniform", "erk")
SEARCHED, PRUNED, LOCKED = 0, 1, 2
_MAX_SEED = 2**63 - 1


# ----------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SLTConfig:
    """What defines a ticket's source network and its search space; checked on construction (one-line
    :class:`InputError`).

    ``keep``: fraction of the weights in the final ticket, in (0, 1); ``freeze``: fraction frozen before the search,
    in [0, 1); ``freeze_prune``: share of the frozen weights that are pruned (the rest are locked), in [0, 1], or None
    for ``1 - keep`` per layer (the frozen part mirrors the ticket's density); ``distribution``: per-layer keep
    ratios, ``uniform`` or ``erk`` (Erdős–Rényi-kernel, Evci et al. 2020); ``init``: ``signed-constant`` or
    ``kaiming-normal``; ``scale_fan``: divide the fan by the layer's keep ratio as edge-popup's ``scale_fan``;
    ``weight_seed``, ``freeze_seed``: regenerate the random weights and the freezing pattern; ``score_seed``: the
    scores' initialisation (not needed to rebuild a ticket).
    """

    keep: float = 0.5
    freeze: float = 0.0
    freeze_prune: float | None = None
    distribution: str = "uniform"
    init: str = "signed-constant"
    scale_fan: bool = True
    weight_seed: int = 0
    freeze_seed: int = 1
    score_seed: int = 2

    def __post_init__(self) -> None:
        checks = [
            (_number(self.keep) and 0 < self.keep < 1, f"--keep must be in (0, 1) (the fraction of weights in the "
                                                       f"ticket), e.g. --keep 0.5; got {self.keep!r}"),
            (_number(self.freeze) and 0 <= self.freeze < 1,
             f"--freeze must be in [0, 1) (the fraction frozen before the search), e.g. --freeze 0.7; got "
             f"{self.freeze!r}"),
            (self.freeze_prune is None or (_number(self.freeze_prune) and 0 <= self.freeze_prune <= 1),
             f"--freeze-prune must be in [0, 1] (the pruned share of the frozen weights), e.g. --freeze-prune 0.5; "
             f"got {self.freeze_prune!r}"),
            (self.distribution in DISTRIBUTIONS,
             f"unknown --distribution {self.distribution!r}; use one of {', '.join(DISTRIBUTIONS)}"),
            (self.init in INITS, f"unknown --init {self.init!r}; use one of {', '.join(INITS)}"),
            (all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _MAX_SEED
                 for s in (self.weight_seed, self.freeze_seed, self.score_seed)),
             "seeds must be integers in [0, 2**63)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        if self.freeze_prune is not None:  # the global feasibility (per layer: layer_plans checks the rounded counts)
            locked, pruned = self.freeze * (1 - self.freeze_prune), self.freeze * self.freeze_prune
            if not (locked <= self.keep + 1e-9 and self.keep <= 1 - pruned + 1e-9):
                raise InputError(
                    f"--keep {self.keep:g} is incompatible with --freeze {self.freeze:g} --freeze-prune "
                    f"{self.freeze_prune:g}: {locked:.3g} of the weights are locked in and {pruned:.3g} pruned, so "
                    f"--keep must lie in [{locked:.3g}, {1 - pruned:.3g}]; change --keep, or lower --freeze")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------- layer plans
@dataclass(frozen=True)
class LayerPlan:
    """One searched layer: ``numel`` weights, of which ``pruned`` are frozen out, ``locked`` frozen in, ``searched``
    searched; the ticket keeps ``locked + topk`` (``topk`` of the searched ones)."""

    name: str
    shape: tuple[int, ...]
    keep_ratio: float
    numel: int
    pruned: int
    locked: int
    searched: int
    topk: int

    @property
    def kept(self) -> int:
        return self.locked + self.topk


def erk_densities(shapes: Sequence[tuple[int, ...]], keep: float) -> list[float]:
    """Per-layer densities of the Erdős–Rényi-kernel distribution (Evci et al., "Rigging the lottery", ICML 2020):
    density ∝ (sum of the weight's dimensions) / (their product), scaled so that the whole network keeps ``keep`` of
    its weights; layers that would exceed 1 are dense and the rest is re-solved."""
    numel = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = keep * sum(numel) - sum(numel[i] for i in dense)
        free = sum(raw[i] * numel[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / free
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def layer_plans(layers: Sequence[tuple[str, tuple[int, ...]]], cfg: SLTConfig) -> list[LayerPlan]:
    """The per-layer counts of ``cfg`` for ``layers`` (name, weight shape); an infeasible layer is a one-line error."""
    shapes = [tuple(s) for _, s in layers]
    keeps = erk_densities(shapes, cfg.keep) if cfg.distribution == "erk" else [cfg.keep] * len(shapes)
    plans = []
    for (name, shape), keep in zip(layers, keeps):
        n = math.prod(shape)
        share = cfg.freeze_prune if cfg.freeze_prune is not None else 1.0 - keep
        pruned, locked = round(n * cfg.freeze * share), round(n * cfg.freeze * (1.0 - share))
        searched, kept = n - pruned - locked, max(1, round(n * keep))
        topk = kept - locked
        if not 0 <= topk <= searched:
            raise InputError(
                f"--keep {cfg.keep:g} is incompatible with the frozen split in layer {name}: it keeps {kept} of {n} "
                f"weights but {locked} are locked in and {pruned} pruned (--freeze {cfg.freeze:g}, --freeze-prune "
                f"{share:g}); lower --freeze or change --freeze-prune")
        plans.append(LayerPlan(name, tuple(shape), keep, n, pruned, locked, searched, topk))
    return plans


# ---------------------------------------------------------------------------------------------- the layers
class _TopK(torch.autograd.Function):
    """0/1 mask of the ``k`` largest entries of ``scores`` where ``eligible``; the gradient goes straight through
    (edge-popup's ``GetSubnet``)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:  # noqa: ARG004
        out = torch.zeros_like(scores)
        if k > 0:
            ranked = torch.where(eligible, scores, torch.full_like(scores, -1.0)).flatten()  # scores are |s| >= 0
            out.view(-1)[torch.topk(ranked, k, sorted=False).indices] = 1.0
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ARG004
        return grad, None, None


class _Searched(nn.Module):
    """Shared state of a searched layer: the frozen random ``weight`` and the ``pattern`` (buffers), the ``scores``
    (the only parameter) and ``topk``. Scores of frozen weights are 0 and get no gradient (``torch.where`` routes
    none to them), so neither SGD nor AdamW (with or without weight decay) ever moves them."""

    weight: torch.Tensor
    pattern: torch.Tensor

    def _setup(self, weight: torch.Tensor, pattern: torch.Tensor, scores: torch.Tensor, topk: int) -> None:
        self.register_buffer("weight", weight)
        self.register_buffer("pattern", pattern)
        self.scores = nn.Parameter(torch.where(pattern == SEARCHED, scores, torch.zeros_like(scores)))
        self.topk = int(topk)

    def mask(self) -> torch.Tensor:
        """The ticket's 0/1 mask: locked weights, plus the top-k scored searched ones (straight-through gradient)."""
        searched = self.pattern == SEARCHED
        chosen = _TopK.apply(self.scores.abs(), searched, self.topk)
        locked = (self.pattern == LOCKED).to(self.weight.dtype)
        return torch.where(searched, chosen, locked)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask()

    def dense(self) -> nn.Module:
        """A plain layer holding ``weight * mask``: what a dense runtime runs."""
        raise NotImplementedError


class SLTConv2d(_Searched):
    """A ``Conv2d`` whose weight is ``random weight * mask`` (no bias)."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, pattern: torch.Tensor, scores: torch.Tensor,
                 topk: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        if conv.padding_mode != "zeros":
            raise InputError(f"compress slt supports zero-padded convolutions only; got padding_mode "
                             f"{conv.padding_mode!r}")
        self._setup(weight, pattern, scores, topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), None, self.stride, self.padding, self.dilation, self.groups)

    def dense(self) -> nn.Conv2d:
        """A plain ``Conv2d`` holding ``weight * mask``: what a dense runtime runs."""
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,  # type: ignore[arg-type]
                        padding=self.padding, dilation=self.dilation, groups=self.groups, bias=False)  # type: ignore[arg-type]
        with torch.no_grad():
            out.weight.copy_(self.masked_weight())
        return out


class SLTLinear(_Searched):
    """A ``Linear`` whose weight is ``random weight * mask`` (no bias)."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, pattern: torch.Tensor, scores: torch.Tensor,
                 topk: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(weight, pattern, scores, topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())

    def dense(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=False)
        with torch.no_grad():
            out.weight.copy_(self.masked_weight())
        return out


_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def slt_layers(model: nn.Module) -> list[tuple[str, _Searched]]:
    """The searched layers of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _Searched)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


_Layer = nn.Conv2d | nn.Linear
_Norm = nn.BatchNorm1d | nn.BatchNorm2d


def _targets(model: nn.Module) -> tuple[list[tuple[str, _Layer]], list[tuple[str, _Norm]]]:
    """Conv2d/Linear layers and BatchNorms of ``model``; anything else holding parameters is a one-line error."""
    layers: list[tuple[str, _Layer]] = []
    norms: list[tuple[str, _Norm]] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            layers.append((name, m))
        elif isinstance(m, _BNS):
            norms.append((name, m))
        elif any(True for _ in m.parameters(recurse=False)):
            raise InputError(f"compress slt searches Conv2d and Linear layers with BatchNorm; module {name!r} "
                             f"({type(m).__name__}) has parameters it cannot handle")
    if not layers:
        raise InputError("the architecture has no Conv2d or Linear layer to search")
    return layers, norms


def _fan_in(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


def _random_weight(shape: tuple[int, ...], keep: float, cfg: SLTConfig, g: torch.Generator) -> torch.Tensor:
    """Edge-popup's initialisation (ReLU gain, fan-in mode; the fan times the keep ratio with ``scale_fan``)."""
    fan = _fan_in(shape) * (keep if cfg.scale_fan else 1.0)
    std = math.sqrt(2.0) / math.sqrt(fan)
    if cfg.init == "kaiming-normal":
        return torch.randn(shape, generator=g) * std
    signs = torch.randint(0, 2, shape, generator=g).to(torch.float32) * 2.0 - 1.0
    return signs * std


def _pattern(plan: LayerPlan, g: torch.Generator) -> torch.Tensor:
    order = torch.randperm(plan.numel, generator=g)
    pattern = torch.full((plan.numel,), SEARCHED, dtype=torch.int8)
    pattern[order[:plan.pruned]] = PRUNED
    pattern[order[plan.pruned:plan.pruned + plan.locked]] = LOCKED
    return pattern.view(plan.shape)


def _scores(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    # kaiming_uniform_(a=sqrt(5)) as in the reference: bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2))
    bound = math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / _fan_in(shape))
    return (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound


def make_slt(model: nn.Module, cfg: SLTConfig) -> nn.Module:
    """A copy of ``model`` (its weights are ignored) made into a searchable random network: every Conv2d/Linear
    becomes an :class:`SLTConv2d`/:class:`SLTLinear` with seeded random weights, frozen pattern and scores, every
    BatchNorm loses its affine parameters. Weights and pattern depend only on the architecture and ``cfg``'s seeds
    (generated on the CPU in module order), so the same seeds give the same network."""
    net = copy.deepcopy(model).cpu()
    layers, norms = _targets(net)
    plans = layer_plans([(name, tuple(m.weight.shape)) for name, m in layers], cfg)
    gw = torch.Generator().manual_seed(cfg.weight_seed)
    gf = torch.Generator().manual_seed(cfg.freeze_seed)
    gs = torch.Generator().manual_seed(cfg.score_seed)
    for (name, module), plan in zip(layers, plans):
        weight = _random_weight(plan.shape, plan.keep_ratio, cfg, gw)
        pattern = _pattern(plan, gf)
        scores = _scores(plan.shape, gs)
        cls = SLTConv2d if isinstance(module, nn.Conv2d) else SLTLinear
        _set(net, name, cls(module, weight, pattern, scores, plan.topk))  # type: ignore[arg-type]
    for name, bn in norms:
        fresh = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False, track_running_stats=True)
        _set(net, name, fresh)
    net.slt_plans = plans  # type: ignore[assignment]
    net.slt_config = cfg  # type: ignore[assignment]
    return net


def plans_of(model: nn.Module) -> list[LayerPlan]:
    plans = getattr(model, "slt_plans", None)
    if plans is None:
        raise InputError("not a network made by compressor.slt.make_slt")
    return list(plans)


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """The ticket as a plain dense network (Conv2d/Linear holding ``weight * mask``, BatchNorm without affine), in
    eval mode on the CPU: what is exported to ONNX and what :func:`load_slt` returns."""
    net = copy.deepcopy(model).cpu().eval()
    for name, layer in slt_layers(net):
        _set(net, name, layer.dense())
    for attr in ("slt_plans", "slt_config"):
        if hasattr(net, attr):
            delattr(net, attr)
    return net


def load_slt(path: str | os.PathLike[str], *, base: nn.Module | None = None) -> nn.Module:
    """Rebuild the exact network of a stored ticket (see :func:`compressor.slt_ticket.load_slt`)."""
    from .slt_ticket import load_slt as load

    return load(path, base=base)



# ------------------------------------------------------------------------------------------------- training
class MaskChurn(Callback):
    """Adds ``mask_churn`` to every epoch record: the fraction of the searched weights whose in/out decision changed
    during the epoch (edge-popup's search settling down as the learning rate decays)."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None

    def _bits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([(layer.mask().flatten()[(layer.pattern == SEARCHED).flatten()] > 0.5)
                              for _, layer in slt_layers(model)])

    def on_train_start(self, state: TrainState) -> None:
        self.previous = self._bits(state.model)

    def on_epoch_end(self, state: TrainState) -> None:
        now = self._bits(state.model)
        if self.previous is not None and now.numel():
            state.history[-1]["mask_churn"] = round(float((now != self.previous).float().mean()), 6)
        self.previous = now


def iter_plan_rows(model: nn.Module) -> Iterator[dict[str, Any]]:
    """One JSON-ready row per searched layer: its counts and ratios."""
    for p in plans_of(model):
        yield {"layer": p.name, "shape": list(p.shape), "weights": p.numel, "pruned": p.pruned, "locked": p.locked,
               "searched": p.searched, "kept": p.kept, "keep_ratio": round(p.kept / p.numel, 6)}
