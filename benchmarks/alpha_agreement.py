"""Time one greedy scoring step of ``--method cmi`` at α = 1.01 (batched eigvalsh) against α = 2 (Frobenius norms).

Also reports how far the two orders agree on the candidates' ranking (Kendall τ, top-k overlap) and how much the
α = 1.01 scores move between float32 and float64. The features are random but structured like a layer's pooled
maps: channels whose mean depends on the label with varying strength, pure-noise channels and exact duplicates.

    python benchmarks/alpha_agreement.py                     # N=256 samples, C=64 candidates, 8x8 maps
    python benchmarks/alpha_agreement.py --n 128 --json

Needs ``compressor`` importable (``pip install -e .``; or from the repository root ``PYTHONPATH=.``, or
``python -m benchmarks.alpha_agreement``). Runs in seconds on 2 CPU cores (``--threads 1`` on a busy host: threaded
MKL LAPACK can stall there); pass ``--device cuda`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch

from compressor.scoring.kernels import gram_matrix, label_gram
from compressor.scoring.mutual_info import joint_gram, score_candidates


@dataclasses.dataclass(frozen=True)
class AlphaAgreement:
    """One run: times in ms (median of the repeats, after a warm-up), agreement of the two rankings."""

    n: int
    channels: int
    dim: int
    dtype: str
    device: str
    threads: int
    gram_ms: float
    alpha_1_01_ms: float
    alpha_2_ms: float
    speedup: float
    kendall_tau: float
    top_k: int
    top_k_overlap: int
    f32_vs_f64_max_abs_bits: float


def structured_features(
    n: int, channels: int, dim: int, *, classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(channels, n, dim)`` features and ``(n,)`` labels: a quarter noise, an eighth duplicates, the rest graded."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = torch.randn(channels, classes, dim, generator=g)
    strength = torch.linspace(0.0, 2.0, channels)[torch.randperm(channels, generator=g)]
    strength[: channels // 4] = 0.0  # pure noise
    x = strength[:, None, None] * means[:, y] + torch.randn(channels, n, dim, generator=g)
    dups = channels // 8
    x[-dups:] = x[channels // 4 : channels // 4 + dups]  # exact copies of informative channels
    return x, y


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall τ-a between two score vectors (concordant minus discordant pairs over all pairs)."""
    da, db = a[:, None] - a[None, :], b[:, None] - b[None, :]
    n = a.numel()
    return float((torch.sign(da) * torch.sign(db)).sum() / (n * (n - 1)))


def _time_ms(fn: Callable[[], object], *, repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (allocator, LAPACK workspace, CUDA kernels)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run(
    *, n: int, channels: int, dim: int, dtype: torch.dtype, device: str, repeats: int, top_k: int
) -> AlphaAgreement:
    x, y = structured_features(n, channels, dim)
    x = x.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gram_ms = _time_ms(lambda: gram_matrix(x), repeats=repeats, sync=sync)
    grams, a_y = gram_matrix(x), label_gram(y.to(device), dtype=dtype)
    # A mid-selection step: two channels already selected, every channel a candidate.
    base = joint_gram(grams[channels // 2], grams[channels // 3])
    t_eig = _time_ms(lambda: score_candidates(base, grams, a_y, alpha=1.01), repeats=repeats, sync=sync)
    t_fro = _time_ms(lambda: score_candidates(base, grams, a_y, alpha=2.0), repeats=repeats, sync=sync)
    s_eig = score_candidates(base, grams, a_y, alpha=1.01).cpu()
    s_fro = score_candidates(base, grams, a_y, alpha=2.0).cpu()
    s_eig64 = score_candidates(base.double(), grams.double(), a_y.double(), alpha=1.01).cpu()
    k = min(top_k, channels)
    overlap = len(set(s_eig.topk(k).indices.tolist()) & set(s_fro.topk(k).indices.tolist()))
    return AlphaAgreement(
        n=n,
        channels=channels,
        dim=dim,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        threads=torch.get_num_threads(),
        gram_ms=round(gram_ms, 2),
        alpha_1_01_ms=round(t_eig, 2),
        alpha_2_ms=round(t_fro, 3),
        speedup=round(t_eig / t_fro, 1),
        kendall_tau=round(kendall_tau(s_eig, s_fro), 3),
        top_k=k,
        top_k_overlap=overlap,
        f32_vs_f64_max_abs_bits=float(f"{float((s_eig.double() - s_eig64).abs().max()):.3g}"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="calibration samples N")
    p.add_argument("--channels", type=int, default=64, help="candidates C scored in one step")
    p.add_argument("--dim", type=int, default=64, help="flattened (pooled) map size per channel")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's); 1 avoids MKL stalls on busy hosts")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(
        n=args.n,
        channels=args.channels,
        dim=args.dim,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        repeats=args.repeats,
        top_k=args.top_k,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        for field, value in dataclasses.asdict(result).items():
            print(f"{field:>26}  {value}")


if __name__ == "__main__":
    main()
