"""Fine-tuning throughput (images/s) of one process and of several under DistributedDataParallel, with the scaling
efficiency.

The model is ResNet-56 (``../shared``) pruned by ``l1`` at ``--target 0.33`` of the filters (``--round-to 8``,
no reconstruction: only the shapes matter here), pruned once in this process; every worker gets the pruned model
and trains it with compressor's own :class:`~compressor.training.Trainer` and the same pieces
``torchrun -m compressor`` uses (:class:`compressor.distributed.DistributedTraining`, :meth:`Dist.shard`,
gloo on CPU, NCCL on GPU), on ``--images`` CIFAR-10 training images with augmentation, ``--batch`` images per
process per step (the CLI's ``--batch-size`` meaning: the global batch grows with the processes). Each setting
trains ``--epochs`` epochs; the first is a warm-up and the throughput is the images of the later epochs over
their seconds (rank 0's clock; every step ends in the gradient all-reduce, so ranks move together).

Settings (CPU): ``1x1`` one process on one thread, ``1x{T}`` one process on all ``--cpus`` threads (what one would
run without DDP), ``{N}x1`` N processes of one thread each, each pinned to its own CPU of ``--cpus``. Scaling
efficiency of N processes = throughput(Nx1) / (N x throughput(1x1)); ``vs_threads`` = throughput(Nx1) /
throughput(1xT). With CUDA: ``gpu 1`` (and ``gpu N`` when N GPUs are visible).

Usage::

    python -m benchmarks.ddp_throughput [--cpus 0,1] [--images 2048] [--batch 64] [--epochs 2]
    python -m benchmarks.ddp_throughput --cpus 1 --images 128 --batch 16 --out /tmp/ddp.json   # a quick check

Writes ``benchmarks/results/ddp_throughput.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from compressor import pipeline as stages
from compressor.config import CompressConfig
from compressor.data import ImageDataset, load_dataset
from compressor.distributed import DistributedTraining, setup, teardown
from compressor.methods import build_method
from compressor.report import machine, versions
from compressor.training import TrainConfig, Trainer

from ._child import write_json
from ._paths import CHECKPOINTS, RESULTS, TRAIN, missing

MODEL = CHECKPOINTS["resnet56"]


def pruned_model(calib: int) -> torch.nn.Module:
    """ResNet-56, ``l1`` at 0.33 of the filters, ``--round-to 8``, as the pipeline's compress stage builds it."""
    cfg = CompressConfig(method="l1", target=0.33, round_to=8, calib_samples=calib, bench_batches=(),
                         quantize="none", reconstruct=False).validate()
    method = build_method("l1", {})
    loaded = stages.load(str(MODEL), arch="resnet56")
    prepared = stages.prepare(loaded, str(TRAIN), None, normalize="cifar", cfg=cfg, method=method)
    return stages.compress_model(loaded.model, method, prepared, cfg, torch.device("cpu")).model.cpu()


def _worker(rank: int, world: int, port: int, setting: dict[str, Any], model_path: str, data_path: str,
            out_path: str) -> None:
    """One process of one setting: join the group (when several), train, rank 0 writes its epoch seconds."""
    cpus = setting["cpus"]
    if setting["device"] == "cpu":
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]} if world > 1 else set(cpus))
    torch.set_num_threads(setting["threads"])
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    where = setup(setting["device"], 600.0)
    device = where.device if where is not None else torch.device(setting["device"])
    model = torch.load(model_path, weights_only=False)
    x, y = torch.load(data_path, weights_only=True)
    data = ImageDataset(x, y)
    config = TrainConfig(epochs=setting["epochs"], lr=0.01 * world, seed=0)
    if where is None:
        from compressor.data import make_loader

        loader: Any = make_loader(data, batch_size=setting["batch"], normalize="cifar", shuffle=True, augment=True)
        trainer = Trainer(config, device=device, progress=False)
    else:
        loader = where.shard(data, batch_size=setting["batch"], normalize="cifar", train=True, augment=True, seed=0)
        trainer = Trainer(config, device=device, callbacks=[DistributedTraining(where)], progress=False,
                          is_main=where.is_main, reduce=where.sum)
    history = trainer.fit(model, loader).history
    if rank == 0:
        torch.save({"seconds": [h["seconds"] for h in history]}, out_path)
    teardown(where)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(setting: dict[str, Any], world: int, model_path: str, data_path: str, images: int) -> dict[str, Any]:
    """Run one setting in ``world`` fresh processes; images/s over the epochs after the first."""
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rank0.pt")
        mp.start_processes(_worker, args=(world, _port(), setting, model_path, data_path, out), nprocs=world,
                           join=True, start_method="spawn")
        seconds = torch.load(out, weights_only=True)["seconds"]
    timed = seconds[1:] or seconds
    per_epoch = images if world == 1 else world * -(-images // world)  # DistributedSampler pads to equal shares
    rate = per_epoch * len(timed) / sum(timed)
    return {**{k: v for k, v in setting.items() if k != "cpus"}, "processes": world, "cpus": setting["cpus"],
            "global_batch": setting["batch"] * world, "epoch_seconds": [round(s, 3) for s in seconds],
            "images_per_s": round(rate, 1)}


def settings(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    base = {"batch": args.batch, "epochs": args.epochs, "cpus": args.cpus}
    n = args.processes
    rows = [("1x1", 1, {**base, "device": "cpu", "threads": 1, "cpus": args.cpus[:1]})]
    if len(args.cpus) > 1:
        rows.append((f"1x{len(args.cpus)}", 1, {**base, "device": "cpu", "threads": len(args.cpus)}))
    rows.append((f"{n}x1", n, {**base, "device": "cpu", "threads": 1}))
    if torch.cuda.is_available() and not args.no_gpu:
        rows.append(("gpu 1", 1, {**base, "device": "cuda", "threads": 1}))
        if torch.cuda.device_count() >= n:
            rows.append((f"gpu {n}", n, {**base, "device": "cuda", "threads": 1}))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")],
                        default=sorted(os.sched_getaffinity(0)), help="CPUs the workers may use, e.g. 0,1")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=2048, help="training images per epoch (all processes)")
    parser.add_argument("--batch", type=int, default=64, help="images per process per step")
    parser.add_argument("--epochs", type=int, default=2, help="the first is a warm-up")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "ddp_throughput.json")
    args = parser.parse_args(argv)
    if missing(MODEL, TRAIN):
        return 0
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    model = pruned_model(args.calib)
    train = load_dataset(str(TRAIN))
    pick = np.random.default_rng(0).choice(len(train), size=args.images, replace=False)
    subset = train.subset(np.sort(pick))
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        model_path, data_path = str(Path(folder) / "model.pt"), str(Path(folder) / "data.pt")
        torch.save(model, model_path)
        torch.save((subset.x, subset.y), data_path)
        for name, world, setting in settings(args):
            rows[name] = measure(setting, world, model_path, data_path, args.images)
            print(f"{name:>6}: {rows[name]['images_per_s']:8.1f} images/s  (epochs {rows[name]['epoch_seconds']} s)",
                  file=sys.stderr, flush=True)
    n, one = args.processes, rows["1x1"]["images_per_s"]
    summary = {"efficiency": round(rows[f"{n}x1"]["images_per_s"] / (n * one), 3),
               "speedup_vs_1x1": round(rows[f"{n}x1"]["images_per_s"] / one, 3),
               "vs_threads": round(rows[f"{n}x1"]["images_per_s"] / rows[f"1x{len(args.cpus)}"]["images_per_s"], 3)}
    # with one CPU "1x1" is also the all-threads row: both processes then share it (a check, not a measurement)
    if f"gpu {n}" in rows:
        summary["gpu_efficiency"] = round(rows[f"gpu {n}"]["images_per_s"] / (n * rows["gpu 1"]["images_per_s"]), 3)
    params = sum(p.numel() for p in model.parameters())
    write_json(args.out, {
        "benchmark": "ddp_throughput", "started": started, "command": "python -m benchmarks.ddp_throughput "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {"arch": "resnet56", "checkpoint": MODEL.name, "method": "l1", "target": 0.33, "round_to": 8,
                  "params": params},
        "images": args.images, "batch_per_process": args.batch, "epochs": args.epochs,
        "rows": rows, "summary": summary, "load_average": os.getloadavg(), "machine": machine(),
        "versions": versions(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    print(f"{n} processes: {summary['speedup_vs_1x1']}x one single-thread process (efficiency "
          f"{summary['efficiency']:.0%}), {summary['vs_threads']}x one process on {len(args.cpus)} threads; "
          f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
