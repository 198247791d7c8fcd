"""``--method tucker``: Tucker-2 factorisation of convolutions, as a :class:`~compressor.methods.base.Method`.

Every eligible convolution (``nn.Conv2d``, ``groups == 1``, kernel larger than 1x1) is replaced, on a copy, by the
``nn.Sequential`` of plain convolutions built by :func:`compressor.factorize.factorize_conv` (1x1 ``reduce`` ->
kxk ``core`` -> 1x1 ``restore``; a 1x1 is dropped where its rank is the full channel count), so the ONNX graph holds
only ``Conv`` nodes. Ranks come from ``--tucker-rank-rule``:

* ``target`` (default): one spectral-energy fraction shared by all layers, found by bisection so that the whole
  method removes ``--target`` of ``--target-metric`` (``params`` by default, or ``macs``) *of the original model*
  (``ctx.original``; :func:`compressor.factorize.allocate_ranks_for_target`). After a pruning step (``l1+tucker``,
  ``cmi+tucker``) the factorisation only has to remove what pruning left over: with :math:`T_0` the original total,
  :math:`T_1` the pruned model's and :math:`t` the target, the step removes :math:`t_1 = 1 - (1 - t) T_0 / T_1` of
  :math:`T_1`, and nothing when :math:`t_1 \\le 0` (pruning alone met the target; the report says so);
* ``evbmf`` / ``energy``: per-layer ranks from the kernel's unfoldings (:func:`compressor.factorize.select_ranks`,
  ``--tucker-energy`` for ``energy``); the target is then *not* enforced, the report gives what was achieved.

A layer is factorised only when that lowers both its parameters and its MACs. 1x1 convolutions are kept dense:
their Tucker-2 form (``C_in r_in + r_in r_out + r_out C_out`` weights) is never cheaper than the rank-``r`` matrix
factorisation it contains (two 1x1s), so they belong to an SVD method, not to this one (none of the CIFAR ResNets
has a 1x1 conv). The record is ``{"kind": "tucker", "layers": {name: [rank_out, rank_in]}}``; :func:`replay_tucker`
rebuilds the same modules so that :func:`compressor.io.load_compressed` loads the weights.

With ``--tucker-latency-aware`` every chosen factorisation is timed against its conv (onnxruntime CPU, batch 1,
``--threads``, on one-node ONNX graphs built here); the slowest losers are kept dense and the ranks chosen again
until every factorisation kept is faster (the target rule then cuts the others deeper). Small 3x3 convs are often
slower factorised: three kernels and two extra activations instead of one kernel.

With ``--tucker-adaptive`` (tolerance ``--tucker-tau``, cycle ``--tucker-period``) the ranks keep changing during
fine-tuning: :meth:`Tucker.apply` returns a :class:`~compressor.methods.tucker_adaptive.AdaptiveTucker` training
callback (:mod:`compressor.methods.tucker_adaptive`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..errors import ModelLoadError, PruningError
from ..factorize import (
    ConvShape,
    allocate_ranks_for_target,
    factorize_conv,
    select_ranks,
    tucker2_cost,
    tucker2_shrinks,
)
from ..options import option
from ..pruning import engine
from .base import Method, MethodContext, MethodResult, register_replay
from .hooks import recording
from .tucker_adaptive import AdaptiveTucker
from .tucker_modules import set_module, tucker_block

__all__ = ["RANK_RULES", "Tucker", "TuckerOptions", "conv_shapes", "measure_layer_latency", "replay_tucker"]

RANK_RULES = ("target", "evbmf", "energy")


@dataclass(frozen=True)
class TuckerOptions:
    """Options of ``--method tucker`` (flags ``--tucker-<name>``)."""

    rank_rule: str = option(
        "target", choices=RANK_RULES, example="evbmf",
        help="how ranks are chosen: target = one spectral-energy fraction for all layers, searched to meet "
             "--target; evbmf = per layer, by variational Bayes (target not enforced); energy = per layer, keeping "
             "--tucker-energy of each unfolding's spectrum (target not enforced)")
    energy: float = option(0.9, low=0.0, high=1.0, low_open=True, example="0.95",
                           help="spectral energy kept per mode with --tucker-rank-rule energy, in (0, 1]")
    adaptive: bool = option(False, example="true",
                            help="rank-adaptive fine-tuning: ranks grow and shrink while training (needs --epochs 1 "
                                 "or more; with --tucker-rank-rule target the params/MACs budget is held)")
    tau: float = option(0.1, low=0.0, high=1.0, low_open=True, high_open=True, example="0.2",
                        help="truncation tolerance of --tucker-adaptive, in (0, 1): each truncation drops the "
                             "smallest singular values of the core up to this fraction of its norm")
    period: int = option(5, low=2, example="10",
                         help="training steps per augment/truncate cycle of --tucker-adaptive (>= 2)")
    latency_aware: bool = option(False, example="true",
                                 help="keep only factorisations measured faster than their conv (onnxruntime, "
                                      "batch 1, --threads)")


# --------------------------------------------------------------------------------------------------- structure
def _eligibility(model: nn.Module, ignore: tuple[str, ...]) -> tuple[dict[str, nn.Conv2d], dict[str, str]]:
    """Convs that may be factorised, and the reason each other Conv2d stays dense."""
    eligible: dict[str, nn.Conv2d] = {}
    dense: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if name in ignore:
            dense[name] = "listed in --ignore-layers"
        elif module.groups != 1:
            dense[name] = f"grouped conv (groups={module.groups}); Tucker-2 needs groups=1"
        elif tuple(module.kernel_size) == (1, 1):
            dense[name] = "1x1 kernel: Tucker-2 never beats a plain low-rank (SVD) split of a 1x1"
        else:
            eligible[name] = module
    return eligible, dense


def conv_shapes(model: nn.Module, convs: Mapping[str, nn.Conv2d], example: torch.Tensor,
                dense: dict[str, str]) -> dict[str, ConvShape]:
    """Geometry of each conv at ``example``'s size (``convs`` keyed by module name in ``model``); convs not run exactly
    once go to ``dense`` with the reason."""
    sizes: dict[str, list[tuple[int, int]]] = {name: [] for name in convs}

    def record(key: tuple[str, bool], x: torch.Tensor) -> None:
        sizes[key[0]].append((int(x.shape[-2]), int(x.shape[-1])))

    with recording(model, [(name, False) for name in convs], record), torch.no_grad():
        model(example[:1])
    shapes = {}
    for name, seen in sizes.items():
        if len(seen) != 1:
            dense[name] = "not run in the forward pass" if not seen else f"run {len(seen)} times per forward (shared)"
        else:
            shapes[name] = ConvShape.from_conv(convs[name], seen[0])
    return shapes


# ----------------------------------------------------------------------------------------------------- ranks
def _target_ranks(convs: Mapping[str, nn.Conv2d], shapes: Mapping[str, ConvShape], *, target: float, metric: str,
                  original_total: int, current_total: int) -> tuple[dict[str, tuple[int, int] | None], dict]:
    """Ranks meeting ``target`` of ``metric`` relative to the original model (see the module docstring)."""
    step_target = 1.0 - (1.0 - target) * original_total / current_total
    facts: dict[str, Any] = {"step_target": round(step_target, 6)}
    if step_target <= 0.0:
        facts["note"] = (f"the preceding pruning already removed {1 - current_total / original_total:.1%} of "
                         f"{metric} (target {target:.1%}); nothing was factorised")
        return {}, facts
    layers = {name: (convs[name].weight, shapes[name]) for name in shapes}
    if not layers:
        raise PruningError(f"no convolution can be Tucker-2 factorised (none has groups=1 and a kernel above 1x1), "
                           f"so {target:.1%} of {metric} cannot be removed; use a pruning method")
    try:
        alloc = allocate_ranks_for_target(layers, target=step_target, metric=metric,  # type: ignore[arg-type]
                                          total=current_total)
    except PruningError as exc:
        if current_total == original_total:
            raise
        raise PruningError(f"after pruning, {exc}; lower the target or let pruning take a larger share") from None
    facts["keep_energy"] = alloc.keep_energy
    return dict(alloc.ranks), facts


def _rule_ranks(convs: Mapping[str, nn.Conv2d], shapes: Mapping[str, ConvShape],
                opts: TuckerOptions) -> dict[str, tuple[int, int] | None]:
    ranks: dict[str, tuple[int, int] | None] = {}
    for name, shape in shapes.items():
        rule: Any = opts.rank_rule
        r_out, r_in = select_ranks(convs[name].weight, rule=rule, energy=opts.energy)
        ranks[name] = (r_out, r_in) if tucker2_shrinks(shape, rank_out=r_out, rank_in=r_in) else None
    return ranks


def _layer_facts(shape: ConvShape, ranks: tuple[int, int]) -> dict[str, Any]:
    dense, factored = shape.dense_cost(), tucker2_cost(shape, rank_out=ranks[0], rank_in=ranks[1])
    return {"ranks": list(ranks), "channels": [shape.c_out, shape.c_in], "params": [dense.params, factored.params],
            "macs": [dense.macs, factored.macs]}


# --------------------------------------------------------------------------------------------------- latency
_LATENCY_REPEATS, _LATENCY_OPSET = 60, 17


def _conv_specs(conv: nn.Conv2d, ranks: tuple[int, int] | None) -> list[dict[str, Any]]:
    """ONNX ``Conv`` attributes and weight shapes of ``conv`` (``ranks=None``) or of its Tucker-2 block."""
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):  # 'valid', or 'same' (stride 1): torch pads the extra row/column at the end
        total = [0, 0] if conv.padding == "valid" else [conv.dilation[d] * (conv.kernel_size[d] - 1) for d in (0, 1)]
        pads = [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2]
    else:
        pads = [*conv.padding, *conv.padding]
    spatial = {"kernel_shape": [kh, kw], "strides": list(conv.stride), "pads": pads, "dilations": list(conv.dilation)}
    if ranks is None:
        return [{"shape": (conv.out_channels, conv.in_channels, kh, kw), "bias": conv.bias is not None, **spatial}]
    block = tucker_block(conv, rank_out=ranks[0], rank_in=ranks[1])
    convs = [(name, cast(nn.Conv2d, m)) for name, m in block.named_children()]
    return [{"shape": tuple(m.weight.shape), "bias": m.bias is not None,
             **(spatial if name == "core" else {"kernel_shape": [1, 1]})} for name, m in convs]


def _write_conv_chain(specs: list[dict[str, Any]], c_in: int, in_hw: tuple[int, int], path: Any) -> None:
    """A plain-``Conv`` ONNX graph with random weights (timing does not depend on the values)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for i, spec in enumerate(specs):
        attrs = {k: v for k, v in spec.items() if k not in ("shape", "bias")}
        inputs = [current, f"w{i}"]
        weights.append(numpy_helper.from_array(rng.standard_normal(spec["shape"], dtype=np.float32), f"w{i}"))
        if spec["bias"]:
            weights.append(numpy_helper.from_array(np.zeros(spec["shape"][0], np.float32), f"b{i}"))
            inputs.append(f"b{i}")
        current = "y" if i == len(specs) - 1 else f"t{i}"
        nodes.append(helper.make_node("Conv", inputs, [current], **attrs))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           ["N", c_in, *in_hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _LATENCY_OPSET)])
    model.ir_version = 8
    onnx.save(model, str(path))


def measure_layer_latency(conv: nn.Conv2d, shape: ConvShape, ranks: tuple[int, int], *,
                          threads: int | None) -> dict[str, Any]:
    """onnxruntime CPU latency (p50, batch 1) of ``conv`` and of its Tucker-2 block, timed interleaved."""
    import tempfile
    from pathlib import Path

    from exporters import benchmark_latency

    with tempfile.TemporaryDirectory(prefix="compressor-tucker-") as tmp:
        paths = {}
        for which, chosen in (("dense", None), ("tucker", ranks)):
            paths[which] = Path(tmp) / f"{which}.onnx"
            _write_conv_chain(_conv_specs(conv, chosen), shape.c_in, shape.in_hw, paths[which])
        bench = benchmark_latency(paths, input_shape=(shape.c_in, *shape.in_hw), batch_sizes=(1,), threads=threads,
                                  repeats=_LATENCY_REPEATS)
    stats = bench.latency[1]
    dense_ms, tucker_ms = stats["dense"].p50_ms, stats["tucker"].p50_ms
    return {"ranks": list(ranks), "dense_ms": round(dense_ms, 5), "tucker_ms": round(tucker_ms, 5),
            "pays_off": tucker_ms < dense_ms}


def _latency_aware(choose: Any, convs: Mapping[str, nn.Conv2d], shapes: Mapping[str, ConvShape],
                   dense: dict[str, str], *, threads: int | None) -> tuple[dict[str, tuple[int, int] | None], dict]:
    """Choose ranks, time every chosen factorisation against its conv, keep the worst quarter of the slower ones
    dense and choose again among the rest (the target rule then cuts their ranks deeper, which makes them faster),
    until every factorisation kept pays off. Excluding a few at a time matters: a conv that is slower at the first
    ranks is often faster at the ranks it gets once fewer layers share the budget."""
    timings: dict[tuple[str, tuple[int, int]], dict[str, Any]] = {}
    slow: dict[str, dict[str, Any]] = {}
    for rounds in range(1, len(shapes) + 2):
        if shapes and len(slow) == len(shapes):
            raise PruningError(f"with --latency-aware, none of the {len(shapes)} eligible convs gets faster when "
                               "factorised at the ranks the target needs (onnxruntime, batch 1); lower the target or "
                               "drop --latency-aware")
        try:
            ranks, facts = choose({n: s for n, s in shapes.items() if n not in slow})
        except PruningError as exc:
            if not slow:
                raise
            raise PruningError(f"with --latency-aware, {len(slow)} of {len(shapes)} convs stay dense because "
                               f"factorising them is slower (onnxruntime, batch 1), and {exc}") from None
        losing = []
        for name, chosen in ranks.items():
            if chosen is not None and (name, chosen) not in timings:
                timings[name, chosen] = measure_layer_latency(convs[name], shapes[name], chosen, threads=threads)
            if chosen is not None and not timings[name, chosen]["pays_off"]:
                t = timings[name, chosen]
                losing.append((t["tucker_ms"] / t["dense_ms"], name, t))
        if not losing:
            break
        for _, name, t in sorted(losing, reverse=True)[:max(1, len(losing) // 4)]:
            slow[name] = t
    for name, t in slow.items():
        dense[name] = (f"latency-aware: factorised at ranks {t['ranks']} it takes {t['tucker_ms']:.4f} ms vs "
                       f"{t['dense_ms']:.4f} ms dense (onnxruntime, batch 1)")
    facts["latency"] = {"rounds": rounds, "measured": {f"{n}@{r[0]}x{r[1]}": t for (n, r), t in timings.items()}}
    return ranks, facts




# ----------------------------------------------------------------------------------------------------- method
class Tucker(Method):
    """Tucker-2 factorisation of the eligible convolutions (see the module docstring)."""

    name = "tucker"
    summary = "Tucker-2 factorisation of each eligible conv (tensorly); only where params and MACs both drop"
    Options = TuckerOptions
    default_metric = "params"
    metrics = ("params", "macs")

    def needs_epochs(self) -> bool:
        return bool(self.options.adaptive)

    def apply(self, model: nn.Module, ctx: MethodContext) -> MethodResult:
        opts, budget = self.options, ctx.budget
        out = copy.deepcopy(model).eval()
        convs, dense = _eligibility(out, tuple(budget.ignore_layers))
        shapes = conv_shapes(out, convs, ctx.example, dense)
        original_total = engine.measure(ctx.original, ctx.example, budget.metric)
        current_total = engine.measure(out, ctx.example, budget.metric)
        choose = self._chooser(convs, target=budget.target, metric=budget.metric, original_total=original_total,
                               current_total=current_total)
        if opts.latency_aware:
            ranks, facts = _latency_aware(choose, convs, shapes, dense, threads=ctx.threads)
        else:
            ranks, facts = choose(shapes)
        layers = _factorise(out, convs, shapes, ranks, dense)
        after = engine.measure(out, ctx.example, budget.metric)
        record = {"kind": "tucker", "layers": {n: [int(r) for r in f["ranks"]] for n, f in layers.items()}}
        report = {"rank_rule": opts.rank_rule, "metric": budget.metric, "target": budget.target,
                  "achieved": 1.0 - after / original_total, "achieved_by_step": 1.0 - after / current_total,
                  **facts, "adaptive": opts.adaptive,
                  **({"tau": opts.tau, "period": opts.period} if opts.adaptive else {}),
                  "layers": layers, "dense": dense}
        callbacks = []
        if opts.adaptive:
            callbacks.append(AdaptiveTucker(record, input_sizes={n: shapes[n].in_hw for n in layers}, tau=opts.tau,
                                            period=opts.period,
                                            metric=budget.metric if opts.rank_rule == "target" else None))
        return MethodResult(out.eval(), [record], {"tucker": report}, callbacks)

    def _chooser(self, convs: Mapping[str, nn.Conv2d], *, target: float, metric: str, original_total: int,
                 current_total: int) -> Callable[[Mapping[str, ConvShape]], tuple[dict[str, Any], dict]]:
        """Ranks for a set of candidate layers, by the rank rule; the latency-aware loop calls it repeatedly."""
        opts = self.options

        def choose(candidates: Mapping[str, ConvShape]) -> tuple[dict[str, Any], dict]:
            if opts.rank_rule == "target":
                return _target_ranks(convs, candidates, target=target, metric=metric,
                                     original_total=original_total, current_total=current_total)
            note = f"rank rule {opts.rank_rule!r} chooses the ranks; --target is not enforced"
            return _rule_ranks(convs, candidates, opts), {"note": note}

        return choose


def _factorise(model: nn.Module, convs: Mapping[str, nn.Conv2d], shapes: Mapping[str, ConvShape],
               ranks: Mapping[str, tuple[int, int] | None], dense: dict[str, str]) -> dict[str, Any]:
    """Replace each conv with chosen ranks by its factorisation (in ``model``); the report's layer facts. Layers left
    dense get their reason in ``dense``."""
    layers: dict[str, Any] = {}
    for name, chosen in ranks.items():
        if chosen is None:
            dense[name] = "factorising would not lower both params and MACs at the allocated ranks"
            continue
        set_module(model, name, factorize_conv(convs[name], rank_out=chosen[0], rank_in=chosen[1]))
        layers[name] = _layer_facts(shapes[name], chosen)
    for name in shapes:
        if layers and name not in layers and name not in dense:
            dense[name] = "not needed to meet the target"
    return layers


def replay_tucker(model: nn.Module, record: Mapping[str, Any], example: torch.Tensor) -> nn.Module:
    """Rebuild the factorised structure of a tucker ``record`` on a freshly built ``model`` (weights load later)."""
    for name, ranks in dict(record.get("layers", {})).items():
        try:
            conv = model.get_submodule(str(name))
        except AttributeError:
            conv = None
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ModelLoadError(f"the saved tucker record names {name!r}, which is not a groups=1 Conv2d of "
                                 "the rebuilt model; was it saved by another version of the architecture?")
        rank_out, rank_in = (int(r) for r in ranks)
        try:
            block = tucker_block(conv, rank_out=rank_out, rank_in=rank_in)
        except ValueError as exc:
            raise ModelLoadError(f"the saved tucker record for {name!r} does not fit the model: {exc}") from None
        set_module(model, str(name), block)
    return model


register_replay("tucker", replay_tucker)
