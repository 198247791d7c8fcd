"""Problems and activation capture of ``--method mipp`` (step 1 of :mod:`compressor.methods.mipp`).

Every consumer ``M`` of a group (a conv or linear layer that reads its channels, ``X_l``) is one :class:`Problem`:
predict ``X_{l+1}``, where ``M``'s output channels are read next, conditioned on ``Z``, the read of that group before
``M`` ran, where there is one. :func:`capture` runs the calibration images once, in chunks of :data:`CHUNK`, fixes
each problem's ``X_{l+1}`` and ``Z`` from the order of execution, and reduces the maps on the fly to what the
estimators read (:class:`Moments`): per-fold Gram matrices of the design rows ``[1, z, x, y]`` (predictor) or maps
pooled per image (renyi).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, PruningError
from ..pruning import engine
from ..pruning.engine import PruningGroup, full_tp_group
from .cmi import Tap, find_taps
from .hooks import recording

__all__ = ["CHUNK", "CaptureOptions", "Moments", "Problem", "capture", "find_problems"]

#: Images per forward pass of the capture (bounds the memory of the hooked maps).
CHUNK = 32


class CaptureOptions(Protocol):
    """The options the capture reads (:class:`compressor.methods.mipp.MIPPOptions` has them)."""

    @property
    def estimator(self) -> str: ...

    @property
    def repeats(self) -> int: ...

    @property
    def positions(self) -> int: ...

    @property
    def pool(self) -> int: ...


# ------------------------------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """One consumer ``M`` (``consumer``) of group ``root``: predict ``X_{l+1}`` from ``X_l``.

    ``x`` reads ``X_l`` (``M``'s input). ``M`` writes channels ``written`` of group ``target_root`` (``None``: ``M``'s
    outputs are no group, and its raw output, or the softmax of an output layer, is the target); ``X_{l+1}`` is read
    at hook point ``target`` with tensor channel ``target_idxs[i]`` for ``written[i]``, and the condition ``Z`` at
    ``cond`` (same channels) when that group was read before ``M`` ran.
    """

    root: str
    consumer: str
    x: Tap
    target_root: str | None
    written: tuple[int, ...]
    target: tuple[str, bool] = ("", False)
    target_idxs: tuple[int, ...] = ()
    cond: tuple[str, bool] | None = None
    cond_idxs: tuple[int, ...] = ()
    softmax: bool = False
    spatial: bool = True
    geometry: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Design columns per channel of ``X_l`` (``k²`` for a spatial conv problem, else 1)."""
        kernel = self.geometry.get("kernel_size", (1, 1))
        return int(kernel[0] * kernel[1]) if self.spatial else 1


def _writers(model: nn.Module, graph: Any, groups: Sequence[PruningGroup]) -> dict[str, tuple[str, tuple[int, ...],
                                                                                           tuple[int, ...]]]:
    """For each conv/linear layer whose output channels belong to a group: ``(group, group channels, layer
    output channels)`` (torch-pruning's ``root_idxs`` and ``idxs`` of the out-channel item)."""
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
    for group in groups:
        for item in full_tp_group(model, graph, group):
            module = item.dep.target.module
            if not graph.is_out_channel_pruning_fn(item.dep.handler) or module not in names:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)) and names[module] not in out:
                pairs = sorted((int(r), int(i)) for r, i in zip(item.root_idxs, item.idxs))
                out[names[module]] = (group.root, tuple(r for r, _ in pairs), tuple(i for _, i in pairs))
    return out


def find_problems(model: nn.Module, graph: Any, groups: Sequence[PruningGroup]) -> dict[str, list[Problem]]:
    """Every group's consumers (``find_taps`` of ``--method cmi``: conv/linear layers that read all its channels).

    The hook points of ``X_{l+1}`` and ``Z`` need the order of execution and are set by :func:`capture`.
    """
    modules = dict(model.named_modules())
    writers = _writers(model, graph, groups)
    problems: dict[str, list[Problem]] = {}
    for root, taps in find_taps(model, graph, groups).items():
        found = []
        for tap in taps:
            if tap.output:
                continue
            module = modules[tap.module]
            target_root, written, _ = writers.get(tap.module, (None, (), ()))
            if target_root is None:
                written = tuple(range(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features))
            geometry = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation")} \
                if isinstance(module, nn.Conv2d) else {}
            found.append(Problem(root, tap.module, tap, target_root, tuple(written), geometry=geometry))
        if not found:
            raise PruningError(f"no conv or linear layer reads all channels of group {root!r}, so mipp has no "
                               f"layer l+1 to preserve; exclude it with --ignore-layer {root}")
        problems[root] = found
    return problems


def _resolve(problems: Mapping[str, list[Problem]], order: Mapping[tuple[str, str], int],
             taps: Mapping[str, Sequence[Tap]], graph: Any, modules: Mapping[str, nn.Module],
             store: Mapping[tuple[str, str], list[torch.Tensor]]) -> None:
    """Set each problem's ``X_{l+1}`` (the first read of the written group after ``M`` ran, else ``M``'s output) and
    ``Z`` (the last read of that group before ``M`` ran), from the execution ``order`` of ``(module, "in"/"out")``.

    A first read by a linear layer of globally pooled maps is moved to the pooling layer's input (``store`` holds
    the first forward pass): the activation map of layer ``l+1`` itself, with 16 to 64 positions per image instead
    of one value, which is what gives the last block's test its power.
    """
    pools = [name for name, m in modules.items() if isinstance(m, _POOLS) and (name, "in") in store]
    for probs in problems.values():
        for p in probs:
            start, end = order[(p.consumer, "in")], order[(p.consumer, "out")]
            reads = [t for t in taps.get(p.target_root or "", []) if not t.output and (t.module, "in") in order]
            after = [t for t in reads if order[(t.module, "in")] > end]
            before = [t for t in reads if order[(t.module, "in")] < start]
            if after:
                nxt = min(after, key=lambda t: order[(t.module, "in")])
                p.target, p.target_idxs = (nxt.module, False), tuple(nxt.idxs[c] for c in p.written)
                read = store[(nxt.module, "in")][0]
                for pool in pools:
                    out = store[(pool, "out")][0]
                    if read.ndim == 2 and out.ndim == 4 and out.shape[2:] == (1, 1) and torch.equal(out.flatten(1),
                                                                                                     read):
                        p.target = (pool, False)
            else:  # the written channels of a layer in no group are its own output channels
                p.target, p.target_idxs = (p.consumer, True), p.written
                node = graph.module2node[modules[p.consumer]]
                p.softmax = p.target_root is None and not engine.reaches_prunable(node)
            if before and p.target_root != p.root:
                prev = max(before, key=lambda t: order[(t.module, "in")])
                p.cond, p.cond_idxs = (prev.module, False), tuple(prev.idxs[c] for c in p.written)


# -------------------------------------------------------------------------------------------------- capture

_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _recorder(store: dict, order: dict) -> Callable[[tuple[str, bool], torch.Tensor], None]:
    """Keep the input and output of every recorded module per forward call in ``store`` under ``(name, "in")`` /
    ``(name, "out")``, and the order in which those first ran in ``order``."""
    def record(key: tuple[str, bool], x: torch.Tensor) -> None:
        point = (key[0], "out" if key[1] else "in")
        order.setdefault(point, len(order))
        store.setdefault(point, []).append(x)
    return record


def _channels(x: torch.Tensor, idxs: Sequence[int]) -> torch.Tensor:
    return x[:, list(idxs)]


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1) if x.ndim > 2 else x


def _target_values(p: Problem, t: torch.Tensor) -> torch.Tensor:
    t = _channels(t, p.target_idxs)
    return torch.softmax(t, dim=1) if p.softmax else t


@dataclass
class Moments:
    """What the estimators read, accumulated over the calibration images.

    ``grams[(root, i)]``: per-fold Gram matrices ``(K, M, M)`` of problem ``i``'s rows ``[1, z, x, y]`` (predictor);
    ``pooled[(root, i)]``: ``(x, y, z)`` maps pooled per image, ``(C, N, d)`` each (renyi); ``folds``: fold per image.
    """

    grams: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    pooled: dict[tuple[str, int], list[list[torch.Tensor]]] = field(default_factory=dict)
    folds: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def nbytes(self) -> int:
        tensors = [*self.grams.values(), *(t for chunks in self.pooled.values() for maps in chunks for t in maps)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _rows(p: Problem, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, positions: int,
          generator: torch.Generator) -> torch.Tensor:
    """Design rows ``[1, z, x, y]`` ``(B, P, M)``: ``P`` random positions of ``M``'s output grid per image (spatial),
    or one row per image with every map averaged over space."""
    b = x.shape[0]
    if p.spatial:
        g = p.geometry
        patches = F.unfold(x, g["kernel_size"], dilation=g["dilation"], padding=g["padding"], stride=g["stride"])
        n_pos = patches.shape[-1]
        count = min(positions, n_pos)
        pos = torch.stack([torch.randperm(n_pos, generator=generator)[:count] for _ in range(b)]).to(x.device)

        def at(t: torch.Tensor) -> torch.Tensor:
            flat = t.flatten(2)
            return torch.gather(flat, 2, pos[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)

        parts = [at(patches), at(y)]
        if z is not None:
            parts.insert(0, at(z))
    else:
        parts = [_pooled(x)[:, None], _pooled(y)[:, None]]
        if z is not None:
            parts.insert(0, _pooled(z)[:, None])
    ones = torch.ones((*parts[0].shape[:2], 1), dtype=parts[0].dtype, device=parts[0].device)
    return torch.cat([ones, *parts], dim=-1).float()


def _spatial(p: Problem, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None) -> bool:
    """A conv consumer whose output grid is the grid of ``X_{l+1}`` (and of ``Z``) gets per-position rows."""
    if not p.geometry or isinstance(p.geometry["padding"], str) or x.ndim != 4 or y.ndim != 4:
        return False
    g = p.geometry
    grid = [(x.shape[2 + d] + 2 * g["padding"][d] - g["dilation"][d] * (g["kernel_size"][d] - 1) - 1)
            // g["stride"][d] + 1 for d in range(2)]
    return list(y.shape[2:]) == grid and (z is None or (z.ndim == 4 and list(z.shape[2:]) == grid))


def _pool_maps(t: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (C, B, d)`` adaptive-average-pooled to at most ``size`` x ``size``; ``(B, C) -> (C, B, 1)``."""
    if t.ndim == 4:
        t = F.adaptive_avg_pool2d(t, (min(size, t.shape[2]), min(size, t.shape[3])))
    return t.flatten(2).permute(1, 0, 2) if t.ndim >= 3 else t.T[:, :, None]


def capture(model: nn.Module, problems: Mapping[str, list[Problem]], taps: Mapping[str, Sequence[Tap]],
            graph: Any, calib: Any, opts: CaptureOptions, *, seed: int) -> tuple[Moments, dict[tuple[str, str], int]]:
    """Run ``calib`` once (in chunks of :data:`CHUNK` images) and reduce every problem to what its estimator reads;
    also return the execution order of the consumers' ``(name, "in"/"out")`` calls.

    The first chunk fixes each problem's ``X_{l+1}`` and ``Z`` (:func:`_resolve`). Images are assigned to
    ``opts.repeats`` balanced folds at random (seeded); positions are drawn per image and problem from the same
    generator, so the same seed and data give the same moments.
    """
    modules = dict(model.named_modules())
    consumers = sorted({p.consumer for probs in problems.values() for p in probs})
    names = consumers + sorted(n for n, m in modules.items() if isinstance(m, _POOLS))
    points = [(name, output) for name in names for output in (False, True)]  # each module's input and output
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    moments, seen = Moments(), 0
    order: dict[tuple[str, str], int] = {}
    folds: list[torch.Tensor] = []
    k = opts.repeats
    with torch.no_grad():
        for batch in calib:
            for x in batch[0].split(CHUNK):
                store: dict = {}
                with recording(model, points, _recorder(store, order)):
                    model(x.to(device))
                if not folds:
                    _check_calls(store, consumers)
                    _resolve(problems, order, taps, graph, modules, store)
                fold = (torch.arange(seen, seen + x.shape[0]) % k)[torch.randperm(x.shape[0], generator=generator)]
                folds.append(fold)
                seen += x.shape[0]
                for root, probs in problems.items():
                    for i, p in enumerate(probs):
                        _accumulate(moments, (root, i), p, store, fold, opts, generator)
    if not seen:
        raise InputError("--method mipp got no calibration batches; pass --data with images (--calib-samples > 0)")
    if seen < 2 * k:
        raise InputError(f"--method mipp needs at least {2 * k} calibration images for {k} folds; got {seen}: "
                         f"raise --calib-samples or lower --mipp-repeats")
    moments.folds = torch.cat(folds)
    return moments, order


def _check_calls(store: Mapping[tuple[str, str], list], names: Sequence[str]) -> None:
    for name in names:
        calls = len(store.get((name, "in"), []))
        if calls != 1:
            what = "never runs" if calls == 0 else f"runs {calls}x"
            raise PruningError(f"layer {name!r} {what} per forward pass, so mipp cannot tell which call reads the "
                               f"channels; exclude its group with --ignore-layer")


def _accumulate(moments: Moments, key: tuple[str, int], p: Problem, store: Mapping, fold: torch.Tensor,
                opts: CaptureOptions, generator: torch.Generator) -> None:
    x = _channels(store[(p.x.module, "in")][0], p.x.idxs)
    y = _target_values(p, store[(p.target[0], "out" if p.target[1] else "in")][0])
    z = _channels(store[(p.cond[0], "in")][0], p.cond_idxs) if p.cond is not None else None
    if opts.estimator == "renyi":
        maps = [_pool_maps(t.float().cpu(), opts.pool) for t in (x, y, z) if t is not None]
        moments.pooled.setdefault(key, []).append(maps)
        return
    if key not in moments.grams:
        p.spatial = _spatial(p, x, y, z)
    rows = _rows(p, x, y, z, opts.positions, generator)
    fold = fold.to(rows.device)
    width = rows.shape[-1]
    grams = moments.grams.get(key)
    if grams is None:
        grams = moments.grams[key] = torch.zeros(opts.repeats, width, width)
    for f in range(opts.repeats):
        part = rows[fold == f].reshape(-1, width)
        grams[f] += (part.T @ part).cpu()
