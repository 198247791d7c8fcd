"""Distributed fine-tuning on PyTorch's own engine: ``torchrun`` starts the processes, ``torch.distributed`` joins
them (NCCL on GPUs, gloo on CPUs), :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients and
:class:`~torch.utils.data.DistributedSampler` shards the training data.

``torchrun --nproc-per-node N -m compressor MODEL ... --epochs E`` (or the ``compress`` script under torchrun) runs
:func:`compressor.compress` in every process; :func:`setup` sees torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
and joins the group. What runs where (:func:`compressor.api.compress`):

* every rank: load the model and the data, check them; top-1 evaluations (each rank its strided share of the
  evaluation images, the counts summed with ``all_reduce``); BatchNorm recalibration (each rank its share of the
  images, the statistics pooled, :func:`pooled_mean`); fine-tuning (DDP, SyncBatchNorm on GPUs);
* rank 0 only: scoring and compression (and reconstruction), whose replay records go to the other ranks with
  ``broadcast_object_list`` and are replayed there (:func:`compressor.methods.base.replay`), the weights following
  with ``broadcast``; export, verification, INT8, benchmark and the output files. The other ranks wait, and every
  rank ends the way rank 0's part ended (:meth:`Dist.main_only`), so all exit with the same code.

A rank that dies makes the others' next collective fail (gloo/NCCL report the lost peer; a peer that hangs is given
up after ``--dist-timeout`` seconds, the process group's timeout); they raise :class:`PeerFailed` before any file is
published. Under torchrun the launcher also stops the surviving workers as soon as one fails (its default, no
restarts). SIGTERM (sent by torchrun when it stops workers, or on Ctrl-C) is turned into ``KeyboardInterrupt`` so the
staging folder is removed on the way out.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .data import ImageDataset, make_loader
from .errors import CompressorError, InputError
from .training import Callback, TrainState

T = TypeVar("T")
#: Seconds a collective waits for the other ranks (rank 0 compresses and exports while they wait).
DEFAULT_TIMEOUT_S = 1800.0
LR_RULE = ("linear scaling (Goyal et al. 2017): --lr is the rate for one process at --batch-size images; with N "
           "processes each takes --batch-size images per step, the global batch is N x --batch-size and the rate "
           "is N x --lr")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class PeerFailed(RuntimeError):
    """Another process of the distributed run died, failed, or did not answer within the timeout."""


def scaled_lr(lr: float, world_size: int) -> float:
    """The learning rate for ``world_size`` processes of the same per-process batch: the linear scaling rule.

    .. math:: \\eta_N = N \\, \\eta_1

    With DDP each step averages the gradients of ``N x b`` images, so the update is the one-process update of a batch
    ``N b``; scaling the rate by N keeps the change per image seen what it was in the run ``--lr`` was tuned for.
    References: P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017 (section 2.1).
    """
    return lr * world_size


def pooled_mean(means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-rank averages combined into the average over all ranks' items, weighted by the items each rank saw.

    .. math:: \\bar m = \\frac{\\sum_r n_r \\, m_r}{\\sum_r n_r}

    ``means`` is ``(ranks, ...)``, ``counts`` ``(ranks,)``. BatchNorm recalibration with ``momentum=None`` keeps the
    plain average of the per-batch means and unbiased variances, so pooling both with ``n_r`` = batches gives what
    one process would have computed over the same batches.
    """
    weights = counts.to(means.dtype).reshape(-1, *([1] * (means.ndim - 1)))
    return (means * weights).sum(0) / weights.sum()


@dataclass(frozen=True)
class Dist:
    """This process's place in the distributed run (None stands for a single process everywhere it is passed)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float
    owns_group: bool = True  # created by :func:`setup` (and destroyed by :func:`teardown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def section(self, *, batch_size: int, lr: float, trained: bool) -> dict[str, Any]:
        """The report's ``distributed`` section."""
        return {"world_size": self.world_size, "backend": self.backend, "per_rank_batch": batch_size,
                "global_batch": batch_size * self.world_size, "lr": lr, "lr_scaled": scaled_lr(lr, self.world_size),
                "lr_rule": LR_RULE, "sync_batchnorm": trained and self.sync_batchnorm, "timeout_s": self.timeout_s,
                "distributed": "evaluation, BatchNorm recalibration, fine-tuning",
                "rank 0 only": "scoring and compression, reconstruction, export, INT8, benchmark, files"}

    @property
    def sync_batchnorm(self) -> bool:
        """SyncBatchNorm needs GPU tensors (PyTorch refuses CPU inputs); on CPU each rank normalises its own batch."""
        return self.device.type == "cuda"

    # ------------------------------------------------------------------------------------------ collectives
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (the evaluation counts, the epoch statistics)."""
        with collective("summing statistics"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; ``broadcast_object_list``)."""
        box = [obj]
        with collective("waiting for rank 0"):
            dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def broadcast_state(self, model: nn.Module, *, buffers_only: bool = False) -> None:
        """Rank 0's parameters and buffers (only buffers with ``buffers_only``) copied into ``model`` on every rank."""
        model.to(self.device)
        tensors = list(model.buffers()) if buffers_only else [*model.parameters(), *model.buffers()]
        with collective("copying rank 0's weights"), torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def pool_bn(self, model: nn.Module, images: int) -> int:
        """Pool every BatchNorm's recalibrated statistics over the ranks (:func:`pooled_mean`, each rank weighted by
        its ``num_batches_tracked``); return the images used on all ranks together."""
        norms = [cast(tuple[torch.Tensor, torch.Tensor, torch.Tensor], (m.running_mean, m.running_var,
                                                                          m.num_batches_tracked))
                 for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
        local = torch.cat([torch.tensor([float(images)], dtype=torch.float64)]
                          + [torch.cat([n.reshape(1), mean, var]).double().cpu() for mean, var, n in norms])
        local = local.to(self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        with collective("pooling BatchNorm statistics"):
            dist.all_gather(gathered, local)
        table = torch.stack(gathered).cpu()  # (ranks, 1 + sum over BNs of 1 + 2C)
        offset = 1
        for mean, var, n in norms:
            c = mean.numel()
            counts, stats = table[:, offset], table[:, offset + 1:offset + 1 + 2 * c]
            pooled = pooled_mean(stats, counts)
            mean.copy_(pooled[:c])
            var.copy_(pooled[c:])
            n.fill_(int(counts.sum()))
            offset += 1 + 2 * c
        return int(table[:, 0].sum())

    def main_only(self, fn: Callable[[], T], share: Callable[[Any], Any]) -> tuple[T | None, Any]:
        """Run ``fn`` on rank 0 only; return ``(its value on rank 0, None elsewhere)`` and ``share(value)`` on every
        rank. When ``fn`` fails, every rank fails the same way: a :class:`CompressorError` everywhere (exit 2),
        ``KeyboardInterrupt`` everywhere (130), anything else a :class:`PeerFailed` on the other ranks (exit 1)."""
        value: T | None = None
        if self.is_main:
            try:
                done = value = fn()
            except CompressorError as exc:
                self._tell(("error", str(exc)))
                raise
            except KeyboardInterrupt:
                self._tell(("interrupted", ""))
                raise
            except Exception as exc:
                self._tell(("failed", f"{type(exc).__name__}: {exc}"))
                raise
            outcome = self.broadcast_object(("ok", share(done)))
        else:
            outcome = self.broadcast_object(None)
        kind, payload = outcome
        if kind == "error":
            raise CompressorError(f"rank 0: {payload}")
        if kind == "interrupted":
            raise KeyboardInterrupt
        if kind == "failed":
            raise PeerFailed(f"rank 0 failed: {payload}")
        return value, payload

    def _tell(self, outcome: tuple[str, str]) -> None:
        """Best effort: after Ctrl-C the other ranks may be gone already; rank 0 keeps its own error."""
        try:
            self.broadcast_object(outcome)
        except PeerFailed:
            pass

    # ------------------------------------------------------------------------------------------------ data
    def shard(self, dataset: ImageDataset, *, batch_size: int, normalize: Any, train: bool, augment: bool,
              seed: int) -> ShardLoader:
        """This rank's batches of ``dataset``: for training a seeded :class:`DistributedSampler` (a new order per
        epoch through ``set_epoch``; padded so that every rank takes the same number of steps); otherwise every
        ``world_size``-th image from ``rank`` (exact counts, nothing repeated: evaluation has no per-batch
        collective, so ranks may see one batch more or less)."""
        sampler: Sequence[int] | DistributedSampler[Any] = (
            DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed,
                               drop_last=False)
            if train else range(self.rank, len(dataset), self.world_size))
        return ShardLoader(dataset, sampler, batch_size=batch_size, normalize=normalize, augment=augment,
                           seed=seed * 1_000_003 + self.rank)

    # ---------------------------------------------------------------------------------------------- model
    def replica(self, original: nn.Module, records: list[dict[str, Any]], example: torch.Tensor) -> nn.Module:
        """Rank 0's compressed structure rebuilt from its replay records on a copy of ``original``; the weights are
        then rank 0's (:meth:`broadcast_state`)."""
        from .methods import replay  # local: the methods import torch-pruning

        return replay(copy.deepcopy(original).cpu(), records, example).eval()


class ShardLoader:
    """One rank's share of a dataset in batches (:func:`compressor.data.make_loader` over the sampler's indices).

    ``sampler`` is what the trainer calls ``set_epoch`` on; augmentation is seeded per rank and epoch.
    """

    def __init__(self, dataset: ImageDataset, sampler: Sequence[int] | DistributedSampler[Any], *, batch_size: int,
                 normalize: Any, augment: bool, seed: int) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.normalize, self.augment, self.seed = normalize, augment, seed

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        part = self.dataset.subset(list(self.sampler))
        return iter(make_loader(part, batch_size=self.batch_size, normalize=self.normalize, shuffle=False,
                                augment=self.augment, seed=self.seed + 7919 * epoch))


class DistributedTraining(Callback):
    """The Trainer's model in :class:`DistributedDataParallel` for the run (gradients averaged over the ranks; DDP
    copies rank 0's weights and buffers at the start), BatchNorm as SyncBatchNorm on GPUs (on a copy, whose trained
    weights are loaded back into the model). At the end every rank takes rank 0's buffers (on CPU each rank kept
    the running statistics of its own batches), so all ranks hold the same model.

    Methods that change the model's structure during training are refused before compression
    (:func:`check_supported`): DDP registers the parameters once."""

    def __init__(self, where: Dist) -> None:
        self.where = where
        self.plain: nn.Module | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.plain = model = state.model
        if self.where.sync_batchnorm and any(isinstance(m, _BN) for m in model.modules()):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
        ids = [self.where.device.index] if self.where.device.type == "cuda" else None
        with collective("wrapping the model in DistributedDataParallel"):
            state.model = DistributedDataParallel(model, device_ids=ids)

    def on_train_end(self, state: TrainState) -> None:
        trained = state.model.module
        assert isinstance(trained, nn.Module) and self.plain is not None
        if trained is not self.plain:
            self.plain.load_state_dict(trained.state_dict())
        self.where.broadcast_state(self.plain, buffers_only=True)
        state.model = self.plain


def check_supported(method: Any, cfg: Any) -> None:
    """Refuse, in one line, what cannot run under DDP: methods that act during fine-tuning (tucker's adaptive ranks
    change layer shapes, mask/score methods change the parameters DDP registered), time budgets (each rank would stop
    after a different step, and DDP needs every rank to take every step) and evaluations at fixed times (same)."""
    if method.needs_epochs():
        raise InputError(f"--method {cfg.method} with these options changes the model while fine-tuning, which "
                         "DistributedDataParallel does not follow; run it in one process (without torchrun)")
    if cfg.budget_minutes is not None:
        raise InputError("--budget-minutes is not supported under torchrun (the ranks would stop after different "
                         "steps); use --epochs")
    if getattr(cfg, "eval_every_minutes", None) is not None:
        raise InputError("--eval-every-minutes is not supported under torchrun (the processes' clocks would disagree "
                         "on when to evaluate together); the per-epoch evaluations still run")


def launched() -> bool:
    """Whether this process is one of several: torchrun's ``WORLD_SIZE`` > 1, or a process group already joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None


def setup(device: str, timeout_s: float) -> Dist | None:
    """Join the process group torchrun described (``env://``), or the one the caller already initialised; None when
    this is the only process. NCCL when the run uses CUDA (``--device cuda``, or ``auto`` with a GPU), else gloo."""
    if not launched():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available to PyTorch; use --device auto or cpu")
        if cuda:
            torch.cuda.set_device(local)
        with collective("joining the process group (torchrun rendezvous)"):
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        _JOINED.append(True)
        _stop_on_sigterm()
    backend = str(dist.get_backend())
    where = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local, backend, where, timeout_s, owns)


def teardown(where: Dist | None) -> None:
    """Leave the process group :func:`setup` created (a group the caller made is the caller's)."""
    if where is not None and where.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _stop_on_sigterm() -> None:
    """SIGTERM -> KeyboardInterrupt, so ``finally`` blocks (the staging folder's removal) run when torchrun stops
    the workers."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


#: Words of the backends' messages for a lost peer. DDP's gradient all-reduce runs inside ``backward`` and gloo's
#: error reaches Python there as a plain ``RuntimeError`` ("[gloo/transport/tcp/pair.cc] Read error ...: Connection
#: reset by peer"), not as ``torch.distributed.DistError``, so the message is all there is to tell it apart.
_PEER_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout")
_BROKEN: list[bool] = []
_JOINED: list[bool] = []  # this process joined a process group through :func:`setup`


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn the backend's error for a lost or silent peer into one :class:`PeerFailed` line."""
    try:
        yield
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if not isinstance(exc, dist.DistError) and not any(w in text.lower() for w in _PEER_WORDS):
            raise
        _BROKEN.append(True)
        raise PeerFailed(f"distributed run failed while {what}: another process died or did not answer within "
                         f"the timeout; no output was written ({text[:300]})") from None


def leave_if_failed(code: int) -> None:
    """After a distributed run that failed (``code != 0``), end the process now with ``code`` (streams flushed;
    ``finally`` blocks have run, so the staging folder is gone). Two reasons: after a lost peer the backend's
    teardown waits on the dead peer's connections before the process can exit (24-37 s measured with gloo, torch
    2.13); and torchrun stops (SIGTERM) every worker still running once one has exited with an error, so a rank
    still in interpreter shutdown when its peer has left would end with -15 instead of the code all ranks agreed
    on (seen with a refused method: rank 1 exited 2, rank 0 was stopped)."""
    if code != 0 and (_BROKEN or _JOINED):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
