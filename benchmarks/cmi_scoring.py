"""Wall time and peak memory of ``--method cmi``'s greedy ordering against a naive per-candidate reference (issue 3).

Three measurements, written to ``benchmarks/results/cmi_scoring.json`` and printed as a table:

1. **One layer, synthetic maps.** ``C`` channels of ``D = 16`` pooled values for ``N`` samples of 10 balanced
   classes; four channels carry one label bit each, the rest are noise (:func:`synthetic_layer`). Grid: N in
   {64, ..., 1024} at C = 64 and C in {16, ..., 512} at N = 256. Variants, all from the raw features, float64:

   - ``library_a2`` / ``library_a1.01``: the library's batched implementation (:func:`library_greedy`: Gram
     matrices built once, a chunk of channels at a time, then each greedy step scores every candidate in one
     :func:`score_candidates` call, the Frobenius shortcut at α = 2 on squares computed once, ``eigvalsh`` in
     batches of 8 candidates at α = 1.01); ``library_gram``: its Gram build alone;
   - ``naive``: the straightforward reference (:func:`naive_greedy`), as in the paper's public code: for every step
     and every candidate it rebuilds the candidate's Gram matrix from its features, forms the joint Hadamard product
     and calls ``torch.linalg.eigvalsh`` on one matrix at a time. It decomposes at any α, so its cost does not depend
     on α; it is timed at α = 1.01, the paper's order. ``tests/benchmarks/test_cmi_scoring.py`` checks that it picks
     the same channels with the same information values as the library, at α = 2 and 1.01;
   - ``library_full_a2``: the whole layer ordered by :func:`~compressor.scoring.selection.greedy_select` at α = 2
     (what the scorer runs: greedy up to the sufficient set, then relevance order, duplicates last).

   ``library_*`` and ``naive`` are timed on the **first ``--steps`` greedy steps** (a fixed amount of work: the
   naive reference orders a whole layer in ``C (C + 1) / 2`` candidate evaluations, hours at the large cells).
   Where one measurement of ``naive`` or ``library_a1.01`` is predicted to take longer than ``--cap`` seconds, both
   run on the first ``m < C`` channels only and their times are scaled by the ratio of candidate evaluations (both
   costs are linear in it): marked ``extrapolated`` (``*`` in the table) with the ``m`` used; their peak memory is
   the one measured with ``m`` channels. The whole-layer cost of the naive reference is extrapolated the same way
   from its measured cost per candidate evaluation (:func:`whole_layer`), and labelled so.

   Every sample runs in a fresh process forked from a forkserver that has only imported torch and the library;
   time is ``perf_counter`` around the call, **peak memory is the process's peak RSS (``ru_maxrss``) minus its RSS
   just before the call** (after the features are built and a tiny warm-up has initialised the kernels). Variants
   are interleaved (rotated within each repeat; a cell is not repeated once its samples took ``--cell-budget``
   seconds) and the table shows medians; speedups are ratios of the medians measured in this one run. One thread
   by default (``--threads``): on a shared 2-core host threaded MKL LAPACK stalls while other processes run (see
   the ResNet-56 figures, taken at both thread counts).

2. **ResNet-56, all layers.** The real ``cmi`` scorer at its defaults (α = 2, ``layer`` conditioning, ``target``
   cutoff at 0.33 of the filters, ``min_keep`` 0.1, ``round_to`` 8, maps pooled to 4x4) on N = 256 CIFAR-10
   training images (``../shared``), as ``compress(..., method="cmi", normalize="imagenet")`` builds it, at 1 thread
   and at torch's default thread count, interleaved, in a fresh process. Skipped with a message naming the missing
   file when ``../shared`` is absent (and with ``--quick``).

3. **GPU.** With CUDA the grid of (1) is also run on the GPU (in process: ``torch.cuda.synchronize`` around the
   call, peak memory from ``torch.cuda.max_memory_allocated`` minus the allocation before); otherwise the JSON
   records ``"no GPU"``.

Usage::

    python -m benchmarks.cmi_scoring            # ~10 minutes on 2 busy CPU cores
    python -m benchmarks.cmi_scoring --quick    # under a minute: small grid, one repeat, no ResNet-56
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.scoring.kernels import gram_matrix, label_gram
from compressor.scoring.mutual_info import joint_gram, score_candidates
from compressor.scoring.selection import greedy_select

from ._child import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models/cifar10-resnet/resnet56-4bfd9763.th"
DEFAULT_DATA = SHARED / "data/cifar10/train.npz"
DEFAULT_OUT = Path(__file__).parent / "results" / "cmi_scoring.json"

DIM = 16
CLASSES = 10
INFORMATIVE = 4
N_GRID, C_AT_N = (64, 128, 256, 512, 1024), 64
C_GRID, N_AT_C = (16, 64, 128, 256, 512), 256
QUICK_N_GRID, QUICK_C_AT_N = (64, 256), 32
QUICK_C_GRID, QUICK_N_AT_C = (16, 128), 128
#: Variants timed per cell; the eigendecomposition-based ones may be capped to fewer channels.
VARIANTS = ("library_gram", "library_a2", "library_a1.01", "naive", "library_full_a2")
CAPPED = ("library_a1.01", "naive")
ALPHA = {"library_gram": 2.0, "library_a2": 2.0, "library_a1.01": 1.01, "naive": 1.01, "library_full_a2": 2.0}
MB = 2.0**20


# ------------------------------------------------------------------------------------------------ the problem


def synthetic_layer(n: int, c: int, *, dim: int = DIM, informative: int = INFORMATIVE, classes: int = CLASSES,
                    noise: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A layer's pooled maps: ``x`` of shape ``(c, n, dim)`` (float64), balanced labels ``y`` of shape ``(n,)``.

    Informative channel ``j`` carries label bit ``j mod 4`` (mean ``2·bit`` in every value, plus ``noise``·N(0, 1));
    the others are N(0, 1) noise. The informative channels sit at evenly spread indices (returned), so that the
    index order gives nothing away.
    """
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    x = torch.randn(c, n, dim, generator=g, dtype=torch.float64)
    k = min(informative, c)
    where = sorted({round(i * c / k) for i in range(k)}) if k else []
    for j, ch in enumerate(where):
        bit = ((y >> (j % 4)) & 1).to(torch.float64)
        x[ch] = 2.0 * bit[:, None] + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x, y, where


@dataclass(frozen=True)
class Trace:
    """First greedy steps of one ordering: the channels picked and ``I(Y; S_k)`` in bits after each pick."""

    order: list[int]
    information: list[float]


# ----------------------------------------------------------------------------------------- naive reference


def naive_gram(x: torch.Tensor) -> torch.Tensor:
    """Unit-trace Gaussian Gram matrix of one channel's samples ``(N, D)``, kernel width the median distance."""
    d2 = torch.cdist(x, x).square()
    iu = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    sigma2 = torch.median(d2[iu[0], iu[1]])
    return torch.exp(-d2 / (2.0 * sigma2)) / x.shape[0]


def naive_entropy(a: torch.Tensor, alpha: float) -> float:
    """Rényi α-entropy in bits of one Gram matrix from its eigenvalues: ``1/(1-α) log2 Σ λ^α`` (``λ`` of ``A/tr A``)."""
    lam = torch.linalg.eigvalsh(a).clamp_min(0.0)
    lam = lam / lam.sum()
    return float(torch.log2((lam**alpha).sum()) / (1.0 - alpha))


def naive_greedy(x: torch.Tensor, y: torch.Tensor, *, alpha: float, steps: int, classes: int = CLASSES) -> Trace:
    """Greedy forward selection, one candidate at a time, everything recomputed (the paper's public code's way).

    Step ``k`` picks ``argmax_c I(Y; S ∪ c) = S(S∘A_c) + S(Y) - S(S∘A_c∘Y)``: for each remaining channel ``c`` the
    Gram matrix ``A_c`` is rebuilt from ``x[c]``, multiplied into the running product of the selected set and
    renormalised, and both entropies come from one ``eigvalsh`` each. Ties go to the lower index, as in the library.
    """
    n = x.shape[1]
    a_y = (y[:, None] == y[None, :]).to(x.dtype) / n
    s_y = naive_entropy(a_y, alpha)
    left, order, information, run = list(range(x.shape[0])), [], [], None
    for _ in range(min(steps, x.shape[0])):
        best: tuple[float, int, torch.Tensor] | None = None
        for c in left:
            joint = naive_gram(x[c]) if run is None else run * naive_gram(x[c])
            joint = joint / joint.trace()
            with_y = joint * a_y
            score = naive_entropy(joint, alpha) + s_y - naive_entropy(with_y / with_y.trace(), alpha)
            if best is None or score > best[0]:
                best = (score, c, joint)
        assert best is not None
        information.append(best[0])
        order.append(best[1])
        left.remove(best[1])
        run = best[2]
    return Trace(order, information)


# ----------------------------------------------------------------------------------------------- the library


def library_greedy(x: torch.Tensor, y: torch.Tensor, *, alpha: float, steps: int, classes: int = CLASSES) -> Trace:
    """The library's greedy steps from raw features: the Gram matrices (built a chunk of channels at a time), at
    α = 2 their squares once, then one batched :func:`score_candidates` call per step on the channels left, by index
    (the loop of :func:`compressor.scoring.selection.greedy_select`)."""
    grams = gram_matrix(x)
    squares = grams.square() if alpha == 2.0 else None
    a_y = label_gram(y, classes, dtype=x.dtype).to(x.device)
    left, order, information, run = list(range(x.shape[0])), [], [], None
    for _ in range(min(steps, x.shape[0])):
        scores = score_candidates(run, grams, a_y, alpha=alpha, candidates=left, squares=squares)
        best = int(torch.argmax(scores))
        information.append(float(scores[best]))
        order.append(left.pop(best))
        run = joint_gram(run, grams[order[-1]])
    return Trace(order, information)


def library_order(x: torch.Tensor, y: torch.Tensor, *, alpha: float, classes: int = CLASSES) -> Trace:
    """The whole layer ordered as the ``cmi`` scorer does (:func:`greedy_select`); the trace holds the order only
    and, as its one information value, the size of the sufficient set."""
    chosen = greedy_select(gram_matrix(x), label_gram(y, classes, dtype=x.dtype).to(x.device), alpha=alpha)
    return Trace(chosen.order.tolist(), [float(chosen.sufficient)])


def run_variant(variant: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> Trace:
    """Run one variant of the benchmark on ``x, y``."""
    if variant == "naive":
        return naive_greedy(x, y, alpha=ALPHA[variant], steps=steps)
    if variant == "library_full_a2":
        return library_order(x, y, alpha=ALPHA[variant])
    if variant == "library_gram":
        gram_matrix(x)
        return Trace([], [])
    return library_greedy(x, y, alpha=ALPHA[variant], steps=steps)


# ------------------------------------------------------------------------------------------------ measuring


def evaluations(channels: int, steps: int) -> int:
    """Candidate evaluations in the first ``steps`` greedy steps over ``channels`` channels."""
    return sum(channels - i for i in range(min(steps, channels)))


def capped_channels(channels: int, steps: int, seconds_per_eval: float, cap: float, *, least: int = 6) -> int:
    """How many channels the eigendecomposition-based variants can run on within ``cap`` seconds (all if they fit).

    ``seconds_per_eval`` is the predicted cost of one candidate evaluation; never fewer than ``least`` channels
    (nor more than there are)."""
    m = channels
    while m > least and evaluations(m, steps) * seconds_per_eval > cap:
        m -= 1
    return max(min(m, channels), min(least, channels))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _problem(spec: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = synthetic_layer(spec["n"], spec["c"], seed=spec.get("seed", 0))
    return x[: spec["channels"]].contiguous().to(device), y.to(device)


def measure_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one variant on one cell in this process and report its peak RSS above the RSS before the call (MiB).

    Meant to run in a fresh process (:func:`_child`): ``ru_maxrss`` only grows, so a process measures one call.
    ``rss_floor_mb`` is how far the peak already stood above the current RSS before the call (memory freed
    earlier); a reported peak at that floor means "at most this much".
    """
    torch.set_num_threads(spec["threads"])
    warm_x, warm_y, _ = synthetic_layer(16, 4)
    run_variant(spec["variant"], warm_x, warm_y, 1)  # first calls initialise MKL/LAPACK
    x, y = _problem(spec, torch.device("cpu"))
    gc.collect()
    before, floor = _rss_mb(), _maxrss_mb()
    start = time.perf_counter()
    trace = run_variant(spec["variant"], x, y, spec["steps"])
    seconds = time.perf_counter() - start
    # ru_maxrss and the RSS read before the call are different counters (they can differ by a few hundred KiB), so
    # a call that allocates nothing can come out slightly negative: that is no growth.
    return {"seconds": seconds, "peak_mb": max(_maxrss_mb() - before, 0.0), "rss_floor_mb": max(floor - before, 0.0),
            "order": trace.order[: spec["steps"]], "extra": trace.information}


def measure_cuda(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one variant on one cell on the GPU; peak memory is ``max_memory_allocated`` above the allocation
    before the call (MiB)."""
    device = torch.device("cuda")
    warm_x, warm_y, _ = synthetic_layer(16, 4)
    run_variant(spec["variant"], warm_x.to(device), warm_y.to(device), 1)
    x, y = _problem(spec, device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    trace = run_variant(spec["variant"], x, y, spec["steps"])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": (torch.cuda.max_memory_allocated() - before) / MB, "rss_floor_mb": 0.0,
            "order": trace.order[: spec["steps"]], "extra": trace.information}


def _child(spec: dict[str, Any], conn: Any) -> None:
    """Entry point of a measuring process: send :func:`measure_cpu`'s result (or the error) back."""
    try:
        conn.send(measure_cpu(spec))
    except Exception as exc:  # noqa: BLE001 (reported in the JSON; the run goes on)
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


class Isolated:
    """Runs :func:`measure_cpu` in a fresh process per call, forked from a forkserver that imported this module."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("forkserver")
        # Not this module itself: a child re-runs ``__main__`` as ``__mp_main__``, which warns when it is preloaded.
        self.ctx.set_forkserver_preload(["torch", "compressor.scoring.selection"])

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(spec, send))
        proc.start()
        send.close()
        try:
            result = receive.recv()
        except EOFError:
            result = {"error": "the measuring process died (out of memory?)"}
        proc.join()
        return result


def seconds_per_eval(n: int, device: torch.device, threads: int) -> float:
    """Predicted cost of one candidate evaluation of the naive reference at ``n`` samples: median of 3 timings
    of one Gram rebuild plus two ``eigvalsh``."""
    torch.set_num_threads(threads)
    x, y, _ = synthetic_layer(n, 2)
    x, y = x.to(device), y.to(device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        naive_greedy(x[:1], y, alpha=1.01, steps=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------ grid


def grid_cells(quick: bool) -> list[tuple[str, int, int]]:
    """``(axis, N, C)`` cells: the N sweep at fixed C, then the C sweep at fixed N (a shared cell only once)."""
    n_grid, c_at_n = (QUICK_N_GRID, QUICK_C_AT_N) if quick else (N_GRID, C_AT_N)
    c_grid, n_at_c = (QUICK_C_GRID, QUICK_N_AT_C) if quick else (C_GRID, N_AT_C)
    cells = [("N", n, c_at_n) for n in n_grid]
    cells += [("C", n_at_c, c) for c in c_grid if (n_at_c, c) not in {(n, c_at_n) for n in n_grid}]
    return cells


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise_cell(axis: str, n: int, c: int, steps: int, channels: dict[str, int],
                   samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per variant (times scaled to all ``c`` channels where capped), the speedups, and the whole-layer
    figures derived from them (:func:`whole_layer`)."""
    variants = {name: _variant_summary(name, runs, c, steps, channels[name]) for name, runs in samples.items()}
    t = {k: v["seconds"] for k, v in variants.items()}
    out: dict[str, Any] = {"axis": axis, "n": n, "c": c, "steps": steps, "variants": variants}
    out["speedup_vs_naive"] = {"alpha_2": _ratio(t.get("naive"), t.get("library_a2")),
                               "alpha_1.01": _ratio(t.get("naive"), t.get("library_a1.01"))}
    out["alpha_1.01_over_alpha_2"] = _ratio(t.get("library_a1.01"), t.get("library_a2"))
    out["extrapolated"] = any(v["extrapolated"] for v in variants.values())
    orders = {k: samples[k][0].get("order") for k in CAPPED if samples.get(k) and "error" not in samples[k][0]}
    if len(orders) == 2 and channels["naive"] == channels["library_a1.01"]:
        out["naive_and_library_agree_at_alpha_1.01"] = orders["naive"] == orders["library_a1.01"]
    out["whole_layer"] = whole_layer(variants, c, steps)
    return out


def _variant_summary(name: str, runs: list[dict[str, Any]], c: int, steps: int, m: int) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    scale = evaluations(c, steps) / evaluations(m, steps) if name in CAPPED and m < c else 1.0
    row: dict[str, Any] = {
        "seconds": _round(_median([r["seconds"] * scale for r in ok])),
        "seconds_samples": [_round(r["seconds"]) for r in ok],
        "peak_mb": _round(_median([r["peak_mb"] for r in ok]), 1),
        "rss_floor_mb": _round(max((r["rss_floor_mb"] for r in ok), default=0.0), 1),
        "channels_run": m, "extrapolated": scale != 1.0,
    }
    if scale != 1.0:
        row["scale"] = round(scale, 3)
    if name == "naive" and ok:
        row["seconds_per_evaluation"] = _round(_median([r["seconds"] for r in ok]) / evaluations(m, steps), 6)
    if name == "library_full_a2" and ok:
        row["sufficient"] = int(ok[0]["extra"][0])
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        row["errors"] = errors
    return row


def whole_layer(variants: dict[str, Any], c: int, steps: int) -> dict[str, Any]:
    """Ordering all ``c`` channels: the library's :func:`greedy_select` at α = 2 (measured) against the naive
    reference's cost per candidate evaluation times the evaluations it would need (extrapolated):

    - ``naive_full_greedy``: greedy over all ``c`` steps, ``c (c + 1) / 2`` evaluations (the paper's procedure);
    - ``naive_same_algorithm``: what :func:`greedy_select` does, done naively: ``c`` relevance evaluations, greedy
      up to the library's sufficient set ``s`` (``evaluations(c, s)``), then one evaluation per remaining channel.

    Also the library's cost per greedy step (``(first-steps time - Gram build time) / steps``, derived).
    """
    naive, full = variants.get("naive", {}), variants.get("library_full_a2", {})
    per_eval, library = naive.get("seconds_per_evaluation"), full.get("seconds")
    gram = variants.get("library_gram", {}).get("seconds")
    out: dict[str, Any] = {"library_greedy_select_a2_seconds": library, "sufficient": full.get("sufficient")}
    if per_eval is not None and full.get("sufficient") is not None:
        s = full["sufficient"]
        out["naive_full_greedy_seconds_extrapolated"] = _round(per_eval * evaluations(c, c), 2)
        out["naive_same_algorithm_seconds_extrapolated"] = _round(per_eval * (c + evaluations(c, s) + c - s), 2)
        out["speedup_vs_naive_full_greedy_extrapolated"] = _ratio(out["naive_full_greedy_seconds_extrapolated"],
                                                                  library)
        out["speedup_vs_naive_same_algorithm_extrapolated"] = _ratio(
            out["naive_same_algorithm_seconds_extrapolated"], library)
    if gram is not None:
        for key in ("library_a2", "library_a1.01"):
            if variants.get(key, {}).get("seconds") is not None:
                out[f"{key}_seconds_per_step_derived"] = _round(max(variants[key]["seconds"] - gram, 0.0) / steps, 5)
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 2) if num is not None and den else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def run_grid(measure: Callable[[dict[str, Any]], dict[str, Any]], device: torch.device, args: argparse.Namespace,
             *, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Measure every cell ``args.repeats`` times, variants rotated within each repeat; summarised per cell."""
    cells = grid_cells(args.quick)
    per_eval = {n: seconds_per_eval(n, device, args.threads) for n in sorted({n for _, n, _ in cells})}
    plan = {}
    for axis, n, c in cells:
        m = capped_channels(c, args.steps, per_eval[n], args.cap)
        plan[(axis, n, c)] = {v: (m if v in CAPPED else c) for v in VARIANTS}
    samples: dict[tuple, dict[str, list]] = {cell: {v: [] for v in VARIANTS} for cell in cells}
    spent = dict.fromkeys(cells, 0.0)
    for rep in range(args.repeats):
        for axis, n, c in cells:
            if rep and spent[(axis, n, c)] >= args.cell_budget:
                continue  # enough samples of an expensive cell: at least one repeat each
            began = time.perf_counter()
            for k in range(len(VARIANTS)):
                v = VARIANTS[(k + rep) % len(VARIANTS)]
                spec = {"variant": v, "n": n, "c": c, "channels": plan[(axis, n, c)][v], "steps": args.steps,
                        "threads": args.threads}
                result = measure(spec)
                samples[(axis, n, c)][v].append(result)
                log(f"rep {rep + 1}/{args.repeats} N={n:<5} C={c:<4} {v:<16} m={spec['channels']:<4} "
                    + (result.get("error") or f"{result['seconds']:.3f}s peak {result['peak_mb']:.0f} MiB"))
            spent[(axis, n, c)] += time.perf_counter() - began
    rows = [summarise_cell(a, n, c, args.steps, plan[(a, n, c)], samples[(a, n, c)]) for a, n, c in cells]
    for row in rows:
        row["seconds_per_eval_predicted"] = _round(per_eval[row["n"]], 5)
        row["repeats"] = len(samples[(row["axis"], row["n"], row["c"])]["naive"])
    return rows


# ---------------------------------------------------------------------------------------------------- ResNet-56


def resnet56_context(model_path: Path, data_path: Path, samples: int) -> Any:
    """The scoring context ``compress(model, data=..., method="cmi", normalize="imagenet")`` builds, at defaults."""
    from compressor import data as data_mod
    from compressor.config import CompressConfig
    from compressor.io import load_model
    from compressor.methods.prune import ScoringContext
    from compressor.pruning import engine

    cfg = CompressConfig(method="cmi")
    model = load_model(model_path, arch="resnet56").model.eval()
    dataset = data_mod.load_dataset(str(data_path))
    calib = data_mod.make_loader(data_mod.calibration_subset(dataset, samples, seed=cfg.seed),
                                 batch_size=cfg.batch_size, normalize=data_mod.parse_normalize("imagenet"))
    example = torch.zeros((1, *dataset.image_shape))
    graph = engine.build_graph(model, example)
    groups = engine.discover_groups(model, graph)
    return ScoringContext(model=model, graph=graph, groups=groups, example_input=example, target=cfg.target,
                          metric="filters", device=torch.device("cpu"), seed=cfg.seed, calib=calib,
                          num_classes=int(model(example).shape[-1]), round_to=cfg.round_to, min_keep=cfg.min_keep)


def measure_resnet56(spec: dict[str, Any]) -> dict[str, Any]:
    """Score all ResNet-56 groups with the ``cmi`` scorer ``spec["repeats"]`` times at each thread count in
    ``spec["threads"]`` (rotated); peak RSS of the first scoring call above the RSS before it."""
    from compressor.methods.cmi import CMI

    setup = time.perf_counter()
    ctx = resnet56_context(Path(spec["model"]), Path(spec["data"]), spec["samples"])
    setup = time.perf_counter() - setup
    runs: list[dict[str, Any]] = []
    peak = None
    gc.collect()
    before = _rss_mb()
    for rep in range(spec["repeats"]):
        threads = spec["threads"]
        for k in range(len(threads)):
            t = threads[(k + rep) % len(threads)]
            torch.set_num_threads(t)
            start = time.perf_counter()
            info = CMI().score(ctx).report
            runs.append({"threads": t, "seconds": time.perf_counter() - start, "parts": info["seconds"],
                         "groups": len(info["layers"]), "samples": info["samples"]})
            peak = max(_maxrss_mb() - before, 0.0) if peak is None else peak
    return {"setup_seconds": setup, "runs": runs, "peak_mb": peak, "options": {"alpha": info["alpha"],
            "condition": info["formulation"], "cutoff": info["cutoff"], "pool": info["pool"]}}


def _resnet_child(spec: dict[str, Any], conn: Any) -> None:
    """Entry point of the ResNet-56 process: send :func:`measure_resnet56`'s result (or the error) back."""
    try:
        conn.send(measure_resnet56(spec))
    except Exception as exc:  # noqa: BLE001 (reported in the JSON)
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def run_resnet56(args: argparse.Namespace, isolated: Isolated) -> dict[str, Any]:
    """The ResNet-56 all-layer ordering in a fresh process; a ``skipped`` entry naming the missing file."""
    for path in (args.model, args.data):
        if not path.exists():
            return {"skipped": f"not found: {path} (the ../shared checkout beside the repo; pass --model/--data)"}
    if args.quick:
        return {"skipped": "--quick"}
    spec = {"model": str(args.model), "data": str(args.data), "samples": 256, "repeats": args.resnet_repeats,
            "threads": sorted({1, torch.get_num_threads()})}
    receive, send = isolated.ctx.Pipe(duplex=False)
    proc = isolated.ctx.Process(target=_resnet_child, args=(spec, send))
    proc.start()
    send.close()
    result = receive.recv()
    proc.join()
    if "error" in result:
        return result
    summary = {}
    for t in spec["threads"]:
        mine = [r for r in result["runs"] if r["threads"] == t]
        summary[f"threads_{t}"] = {
            "seconds": round(statistics.median(r["seconds"] for r in mine), 2),
            "select_seconds": round(statistics.median(r["parts"]["select"] for r in mine), 2),
            "capture_seconds": round(statistics.median(r["parts"]["capture"] for r in mine), 2),
            "allocate_seconds": round(statistics.median(r["parts"]["allocate"] for r in mine), 2),
            "samples_seconds": [round(r["seconds"], 2) for r in mine]}
    return {"model": spec["model"], "samples": result["runs"][0]["samples"], "groups": result["runs"][0]["groups"],
            "options": result["options"], "setup_seconds": round(result["setup_seconds"], 1),
            "peak_mb": round(result["peak_mb"], 1), "median": summary}


# ------------------------------------------------------------------------------------------------------ report


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _time(variant: dict[str, Any]) -> str:
    sec = variant["seconds"]
    return "err" if sec is None else f"{sec:.3f}" + ("*" if variant["extrapolated"] else " ")


def _row(r: dict[str, Any]) -> str:
    v, w, sp = r["variants"], r["whole_layer"], r["speedup_vs_naive"]
    mem = " / ".join(_num(v[k]["peak_mb"], ".0f") + ("*" if v[k]["extrapolated"] else "")
                     for k in ("library_a2", "library_a1.01", "naive", "library_full_a2"))
    return (f"{r['n']:>5} {r['c']:>4} | {_time(v['library_gram']):>7} {_time(v['library_a2']):>8} "
            f"{_time(v['library_a1.01']):>10} {_time(v['naive']):>10} | {_num(sp['alpha_2'], '.1f'):>6} "
            f"{_num(sp['alpha_1.01'], '.2f'):>7} {_num(r['alpha_1.01_over_alpha_2'], '.1f'):>8} | "
            f"{_time(v['library_full_a2']):>8} {_num(w.get('sufficient'), 'd'):>4} "
            f"{_num(w.get('naive_same_algorithm_seconds_extrapolated'), '.3g'):>11} "
            f"{_num(w.get('speedup_vs_naive_same_algorithm_extrapolated'), '.3g'):>5} "
            f"{_num(w.get('naive_full_greedy_seconds_extrapolated'), '.4g'):>10} "
            f"{_num(w.get('speedup_vs_naive_full_greedy_extrapolated'), '.3g'):>6} | {mem}")


def table(rows: list[dict[str, Any]], device: str) -> str:
    """The grid as a plain-text table of medians; ``*`` marks times scaled from fewer channels."""
    head = (f"{'N':>5} {'C':>4} | {'gram':>7} {'lib a2':>8} {'lib a1.01':>10} {'naive':>10} | {'x a2':>6} "
            f"{'x a1.01':>7} {'a1.01/a2':>8} | {'full a2':>8} {'suff':>4} {'~naive same':>11} {'x':>5} "
            f"{'~naive all':>10} {'x':>6} | peak MiB a2 / a1.01 / naive / full")
    lines = [f"{device}. Times in s (median). First {rows[0]['steps']} greedy steps from raw features:", head]
    lines += [_row(r) for r in rows]
    lines.append("gram: the library's Gram build alone. x: speedup of the library over the naive reference (ratio "
                 "of medians). *: run on m < C channels, time scaled to C (memory as measured at m). full a2: "
                 "greedy_select on the whole layer (measured); suff: its sufficient set; ~naive same / ~naive all: "
                 "the naive cost per candidate evaluation times the evaluations of the same algorithm / of a full "
                 "greedy (extrapolated).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, one repeat, no ResNet-56 (< 1 minute)")
    parser.add_argument("--steps", type=int, help="greedy steps timed per cell (default 3; 2 with --quick)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per cell (default 3; 1 with --quick)")
    parser.add_argument("--cap", type=float, help="seconds one capped measurement may take (default 4; 1 quick)")
    parser.add_argument("--cell-budget", type=float, default=40.0,
                        help="no further repeats of a cell once its samples took this many seconds (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the grid (default 1)")
    parser.add_argument("--resnet-repeats", type=int, default=1, help="ResNet-56 scorings per thread count")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.cap = args.cap or (1.0 if args.quick else 4.0)
    default_threads = torch.get_num_threads()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    began, load_before = time.perf_counter(), os.getloadavg()
    isolated = Isolated()
    cpu_rows = run_grid(isolated, torch.device("cpu"), args, log=log)
    torch.set_num_threads(default_threads)
    if torch.cuda.is_available():
        gpu: Any = {"device": torch.cuda.get_device_name(0),
                    "rows": run_grid(measure_cuda, torch.device("cuda"), args, log=log)}
    else:
        gpu = "no GPU (torch.cuda.is_available() is False): GPU figures not measured"
    resnet = run_resnet56(args, isolated)
    result = {
        "benchmark": "cmi_scoring", "quick": args.quick,
        "settings": {
            "steps_timed": args.steps, "repeats": args.repeats, "cell_budget_seconds": args.cell_budget,
            "cap_seconds": args.cap, "threads": args.threads,
            "dim": DIM, "classes": CLASSES, "informative_channels": INFORMATIVE, "dtype": "float64",
            "naive_alpha": ALPHA["naive"],
            "time": "perf_counter around one call, median of the interleaved repeats; speedups are ratios of medians",
            "memory": "CPU: ru_maxrss of a fresh forked process minus its RSS just before the call (after imports, "
                      "features built, warm-up); CUDA: max_memory_allocated minus memory_allocated before",
            "extrapolated": "library_a1.01 and naive run on the first m channels when predicted over cap_seconds; "
                            "their times are scaled by evaluations(C)/evaluations(m); peak memory is measured at m",
        },
        "cpu": cpu_rows, "gpu": gpu, "resnet56": resnet,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "default_threads": default_threads, "processor": platform.processor() or platform.machine(),
                    "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_before],
                                                "end": [round(x, 2) for x in os.getloadavg()]}},
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    write_json(args.out, result)
    print(table(cpu_rows, f"CPU, {args.threads} thread(s)"))
    if isinstance(gpu, dict):
        print(table(gpu["rows"], gpu["device"]))
    else:
        print(gpu)
    print("ResNet-56, all 30 groups ordered by the cmi scorer at defaults:", json.dumps(resnet.get("median", resnet)))
    print(f"wrote {args.out} in {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
