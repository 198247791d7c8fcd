"""The thread policy: the one place that decides how many intra-op threads each pipeline stage runs on.

Stages: ``score`` (a method's scoring: many small linear-algebra calls), ``train``, ``evaluate`` (also BatchNorm
recalibration), ``export`` (ONNX export and the PyTorch side of the parity check), ``benchmark`` (onnxruntime's
``intra_op_num_threads``; None = onnxruntime's default).

The rule (``ThreadPolicy(threads).for_stage(stage)``):

1. ``threads`` given (``--threads N``, ``compress(..., threads=N)``): N for every stage, ``benchmark`` included.
   Nothing is probed, so the thread counts, and the results, are the same from run to run.
2. otherwise ``score``: 1 thread, always.
3. otherwise ``train``, ``evaluate``, ``export``: the CPUs left free by other processes, measured just before the
   stage (:func:`others_busy_cores`, 0.25 s), at least 1 and at most ``cores`` (torch's default, one per physical
   core)::

       threads = clamp(floor(cpus - others + 0.25), 1, cores)

   so a thread is added only for a CPU at least 3/4 idle. Quiet 2-CPU machine: 2; beside one busy thread: 1.
4. otherwise ``benchmark``: None (onnxruntime's default; its sessions do not spin, see ``exporters.benchmark``).

Why (``python -m benchmarks.contention``, ``benchmarks/results/contention.json``; 2-CPU AMD EPYC VM, torch 2.13
with GNU OpenMP; the competitor is a second process running a 2-thread loop of 512x512 matmuls; slowdown =
contended / quiet seconds)::

    stage       model     setting (threads quiet/contended)   quiet s  contended s  slowdown
    score cmi   ResNet-20 policy (1/1)                          2.13      3.49       1.64
                          torch default (2/2)                   1.48     11.25       7.60
    score mipp  ResNet-20 policy (1/1)                         37.34     56.91       1.52
                          torch default (2/2)                  26.11   >=117.2      >=3.0 (stopped at 3x)
    score cmi   ResNet-56 policy (1/1)                          6.40      9.14       1.43
                          torch default (2/2)                   4.44     41.44       9.33
    score mipp  ResNet-56 policy (1/1)                         53.09     78.22       1.47
                          torch default (2/2)                  40.34   >=180.0      >=2.87 (stopped at the cap)
    train       ResNet-20 policy (2/1) / 1 thread / default     3.05 / 4.86 / 2.48   7.20 / 7.44 / 13.80
    train       ResNet-56 policy (2/1) / 1 thread / default     2.70 / 5.77 / 2.92   8.68 / 7.18 / 9.97
    evaluate    ResNet-20 policy (2/1) / 1 thread / default     2.21 / 3.93 / 2.93   7.44 / 4.33 / 9.83
    evaluate    ResNet-56 policy (2/1) / 1 thread / default     2.35 / 4.26 / 2.03   5.38 / 4.94 / 7.51

Scoring meets the goal (under 2x) on one thread in all four runs; torch's default of 2 threads is 1.4x faster quiet
but 3-9x slower beside the competitor. Training and evaluation (8 or 3 SGD steps of batch 128, forward passes of
batch 250; ``--tasks train,evaluate``, ``benchmarks/results/contention-train-evaluate.json``): the probe takes about
the quiet time of 2 threads and the contended time of 1 thread (within this machine's noise; 1-thread contended runs
varied by up to 1.7x), so its slowdown is ~2-3x by construction: half the CPUs are gone, while the torch default
slows 3.4-5.6x.

OpenMP parallel regions end at a barrier: when the cores are oversubscribed, one preempted thread makes the others
wait (spinning, by default) until it is scheduled again. Scoring's regions are microseconds long, so it pays that
price per call, millions of times; a second thread gains little even on a quiet machine. Training and evaluation
run large convolutions, where a second thread gains when the CPU is free and loses just as badly when it is not,
hence the probe. Training probes again after every epoch (:class:`compressor.pipeline.RefreshThreads`); other
stages keep the count they started with; ``--threads 1`` is the safe choice on a machine known to be shared.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

STAGES = ("score", "train", "evaluate", "export", "benchmark")
PROBED = ("train", "evaluate", "export")
PROBE_SECONDS = 0.25
_TORCH_DEFAULT = torch.get_num_threads()  # before anyone in this process changed it (compressor imports this early)


def torch_default_threads() -> int:
    """Torch's intra-op thread count when this module was imported: one per physical core, or ``OMP_NUM_THREADS``."""
    return _TORCH_DEFAULT


def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def read_cpu_times() -> list[int] | None:
    """The machine's cumulative CPU times (the ``cpu`` line of ``/proc/stat``, clock ticks); None off Linux."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


def busy_cores(before: list[int], after: list[int], cpus: int) -> float:
    """Average number of busy CPUs between two :func:`read_cpu_times` samples.

    With the fields user, nice, system, idle, iowait, irq, softirq, steal...:
    ``busy = (1 - (d idle + d iowait) / d total) * cpus``; steal counts as busy (another VM had the CPU).

    >>> busy_cores([100, 0, 0, 100, 0], [150, 0, 0, 150, 0], cpus=2)
    1.0
    """
    total = sum(after) - sum(before)
    if total <= 0:
        return 0.0
    idle = (after[3] - before[3]) + (after[4] - before[4] if len(after) > 4 else 0)
    return round((1.0 - idle / total) * cpus, 3)


def others_busy_cores(seconds: float = PROBE_SECONDS) -> float | None:
    """CPUs kept busy by other processes over the next ``seconds``: machine-wide busy CPUs less this process's CPU
    time (all its threads) over the same wall time. None where ``/proc/stat`` is not available."""
    before, cpu0, wall0 = read_cpu_times(), time.process_time(), time.perf_counter()
    if before is None:
        return None
    time.sleep(seconds)
    after, cpu1, wall1 = read_cpu_times(), time.process_time(), time.perf_counter()
    if after is None:
        return None
    mine = (cpu1 - cpu0) / max(wall1 - wall0, 1e-9)
    return max(0.0, busy_cores(before, after, os.cpu_count() or 1) - mine)


def free_threads(cores: int, cpus: int, others: float | None) -> int:
    """``clamp(floor(cpus - others + 0.25), 1, cores)``; ``others=None`` (not measurable) counts as idle.

    >>> free_threads(2, 2, 0.1), free_threads(2, 2, 0.8), free_threads(2, 2, 2.0), free_threads(16, 32, 4.0)
    (2, 1, 1, 16)
    """
    if others is None:
        return cores
    return max(1, min(cores, math.floor(cpus - others + 0.25)))


class ThreadPolicy:
    """Intra-op threads per pipeline stage (the rule is in the module docstring).

    Parameters
    ----------
    threads : int, optional
        The user's ``--threads``: used for every stage when given.
    cores : int, optional
        The most threads a probed stage may use; default :func:`torch_default_threads`.
    probe : callable, optional
        Returns the CPUs busy with other processes (or None); default :func:`others_busy_cores`.

    Examples
    --------
    >>> policy = ThreadPolicy(cores=2, probe=lambda: 1.0)
    >>> policy.for_stage("score"), policy.for_stage("train"), policy.for_stage("benchmark")
    (1, 1, None)
    >>> ThreadPolicy(4).for_stage("score"), ThreadPolicy(4).onnxruntime()
    (4, 4)
    >>> with ThreadPolicy(1).apply("train"):  # torch.set_num_threads(1) inside, restored after
    ...     pass
    """

    def __init__(self, threads: int | None = None, *, cores: int | None = None,
                 probe: Callable[[], float | None] | None = None) -> None:
        for name, value in (("threads", threads), ("cores", cores)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None; got {value!r}")
        self.threads = threads
        self.cores = cores if cores is not None else torch_default_threads()
        self.probe = probe if probe is not None else others_busy_cores
        self.chosen: dict[str, int | None] = {}  # the last count decided per stage, for the report

    def for_stage(self, stage: str) -> int | None:
        """Threads for ``stage`` (torch intra-op threads; for ``benchmark`` onnxruntime's, None = its default)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        if self.threads is not None:
            count: int | None = self.threads
        elif stage == "score":
            count = 1
        elif stage == "benchmark":
            count = None
        else:
            count = free_threads(self.cores, available_cpus(), self.probe())
        self.chosen[stage] = count
        return count

    def onnxruntime(self) -> int | None:
        """``intra_op_num_threads`` for onnxruntime sessions: ``for_stage("benchmark")``."""
        return self.for_stage("benchmark")

    def refresh(self, stage: str) -> int | None:
        """Decide ``stage``'s count again and set it now: for a long stage (training) to call between epochs inside
        :meth:`apply`, whose exit still restores the count from before the stage. Returns the count."""
        count = self.for_stage(stage)
        if count is not None and stage != "benchmark":
            torch.set_num_threads(count)
        return count

    @contextmanager
    def apply(self, stage: str) -> Iterator[int | None]:
        """Run the block with torch's intra-op threads set for ``stage``; the previous count is restored on exit,
        exceptions included. Yields the count (``benchmark``: onnxruntime's, and torch's is left as it is)."""
        previous = torch.get_num_threads()
        count = self.refresh(stage)
        try:
            yield count
        finally:
            torch.set_num_threads(previous)
