"""Distributed fine-tuning (torchrun / DistributedDataParallel, gloo on CPU): two real processes per test.

* two ranks of batch b end with identical weights and match one process of batch 2b (a model without BatchNorm);
  BatchNorm statistics recalibrated on two shards and pooled equal one process's over the same batches;
* ``torchrun --nproc-per-node 2 -m compressor ...`` runs end to end and only rank 0 writes; so do two torchrun
  launchers joined as two nodes (``--nnodes 2 --node-rank R``);
* a rank that dies makes the other fail with one clear error within the timeout, writing nothing;
* Ctrl-C on the launcher (SIGINT to its process group) stops every rank, writing nothing;
* what DDP cannot follow (tucker's adaptive ranks, a time budget) is refused in one line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from typer.testing import CliRunner

from compressor import cli
from compressor.data import ImageDataset
from compressor.distributed import Dist, DistributedTraining, PeerFailed, pooled_mean, scaled_lr, setup, teardown
from compressor.models import create_model
from compressor.models.samplenet import SampleNet
from compressor.evaluation import recalibrate_bn
from compressor.training import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20.0  # the process group's timeout in these tests
CPU = torch.device("cpu")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(env: dict[str, str]) -> Dist:
    os.environ.update(env)
    torch.set_num_threads(1)
    where = setup("cpu", TIMEOUT_S)
    assert where is not None
    return where


def _env(rank: int, port: int) -> dict[str, str]:
    return {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _spawn(fn: Any, args: tuple[Any, ...], deadline_s: float = 90.0) -> list[int | None]:
    """Run ``fn(rank, *args)`` in 2 spawned processes; their exit codes (None: still running at the deadline)."""
    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    for p in ctx.processes:
        p.join(max(0.1, end - time.monotonic()))
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    return codes


# ------------------------------------------------------------------------------------------ the maths
def test_linear_scaling_rule() -> None:
    assert scaled_lr(0.01, 1) == pytest.approx(0.01)
    assert scaled_lr(0.01, 4) == pytest.approx(0.04)


def test_pooled_mean_weights_each_rank_by_its_count() -> None:
    means = torch.tensor([[1.0, 10.0], [4.0, 40.0]])
    pooled = pooled_mean(means, torch.tensor([1, 3]))
    assert torch.allclose(pooled, torch.tensor([(1 + 3 * 4) / 4, (10 + 3 * 40) / 4]))


# ------------------------------------------------------------------------------ DDP vs one process
def _data(n: int = 32) -> ImageDataset:
    g = torch.Generator().manual_seed(1)
    return ImageDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 4))


def _with_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


CONFIG = TrainConfig(epochs=2, lr=0.2, momentum=0.9, weight_decay=5e-4, seed=0)


def _fit(model: nn.Module, where: Dist, batch: int, callbacks: list[Any]) -> list[dict[str, Any]]:
    ds = _data()
    trainer = Trainer(CONFIG, device=CPU, callbacks=callbacks, progress=False, is_main=where.is_main,
                      reduce=where.sum if where.world_size > 1 else None)
    loader = where.shard(ds, batch_size=batch, normalize=None, train=True, augment=False, seed=3)
    evals = where.shard(ds, batch_size=5, normalize=None, train=False, augment=False, seed=3)
    return trainer.fit(model, loader, eval_loader=evals).history


def _train_worker(rank: int, port: int, folder: str) -> None:
    where = _join(_env(rank, port))
    plain, bn = _plain(), _with_bn()
    history = _fit(plain, where, 4, [DistributedTraining(where)])
    _fit(bn, where, 4, [DistributedTraining(where)])
    recal = _with_bn()
    loader = where.shard(_data(), batch_size=3, normalize=None, train=False, augment=False, seed=0)
    images = where.pool_bn(recal, recalibrate_bn(recal, loader))
    torch.save({"plain": plain.state_dict(), "bn": bn.state_dict(), "recal": recal.state_dict(), "images": images,
                "history": history}, Path(folder) / f"rank{rank}.pt")
    teardown(where)


def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(tmp_path: Path) -> None:
    assert _spawn(_train_worker, (_port(), str(tmp_path))) == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("plain", "bn"):  # every parameter and buffer identical on both ranks
        for name, tensor in ranks[0][key].items():
            assert torch.equal(tensor, ranks[1][key][name]), (key, name)
    alone = Dist(0, 1, 0, "none", CPU, TIMEOUT_S, owns_group=False)
    single = _plain()
    history = _fit(single, alone, 8, [])  # 32 images: 4 steps of 8 per epoch, as 2 ranks x 4 steps of 4
    for name, tensor in single.state_dict().items():
        assert torch.allclose(ranks[0]["plain"][name], tensor, atol=1e-5, rtol=1e-4), name
    assert not torch.allclose(_plain().state_dict()["4.weight"], single.state_dict()["4.weight"])  # it trained
    for ddp, one in zip(ranks[0]["history"], history):  # statistics summed over the ranks = one process's
        assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert ddp["train_acc"] == pytest.approx(one["train_acc"])
        assert ddp["eval_acc"] == pytest.approx(one["eval_acc"])
    # BatchNorm recalibration on two shards, pooled = one process over the same batches
    recal = _with_bn()
    shards = [Dist(r, 2, r, "none", CPU, TIMEOUT_S, owns_group=False).shard(
        _data(), batch_size=3, normalize=None, train=False, augment=False, seed=0) for r in (0, 1)]
    both = [batch for shard in shards for batch in shard]
    assert ranks[0]["images"] == recalibrate_bn(recal, both) == 32
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.allclose(ranks[1]["recal"][name].double(), recal.state_dict()[name].double(), atol=1e-6), name


# --------------------------------------------------------------------------------------- end to end
def _inputs(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = folder / "net.pt"
    torch.save({"state_dict": create_model("samplenet").state_dict(), "arch": "samplenet"}, model)
    rng = np.random.default_rng(0)
    data = folder / "data.npz"
    np.savez(data, x=rng.integers(0, 255, (48, 32, 32, 3), dtype=np.uint8), y=np.arange(48) % 10)
    return model, data


def test_torchrun_runs_the_cli_and_only_rank_0_writes(tmp_path: Path) -> None:
    model, data = _inputs(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           "-m", "compressor", str(model), "--data", str(data), "--eval-data", str(data), "--method", "l1",
           "--target", "0.3", "--round-to", "1", "--epochs", "1", "--batch-size", "8", "--bench-batch", "none",
           "--quantize", "none", "--device", "cpu", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "net.pt", "out"]  # no stray folder or file
    assert sorted(p.name for p in out.iterdir()) == ["compressed.onnx", "compressed.pt", "original.onnx",
                                                     "report.json", "report.md"]
    assert done.stderr.count("wrote ") == 1 and done.stdout.count("parity:") == 1  # rank 1 printed nothing
    report = json.loads((out / "report.json").read_text())
    section = report["distributed"]
    assert (section["world_size"], section["backend"], section["per_rank_batch"], section["global_batch"]) == (
        2, "gloo", 8, 16)
    assert section["lr_scaled"] == pytest.approx(2 * report["options"]["lr"])
    assert report["finetune"]["history"][0]["lr"] <= section["lr_scaled"]
    assert "Distributed fine-tuning" in (out / "report.md").read_text()


def test_two_nodes_joined_by_torchrun_rendezvous_flags_run_as_one_job(tmp_path: Path) -> None:
    """Multi-node as torchrun does it (``--nnodes 2 --node-rank R --master-addr --master-port``), both "nodes" on
    this machine: one job of world size 2, only global rank 0 (on node 0) writes, both launchers exit 0."""
    model, data = _inputs(tmp_path)
    out, port = tmp_path / "out", str(_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
         "-m", "compressor", str(model), "--data", str(data), "--eval-data", str(data), "--method", "l1",
         "--target", "0.3", "--round-to", "1", "--epochs", "1", "--batch-size", "8", "--bench-batch", "none",
         "--quantize", "none", "--device", "cpu", "--threads", "1", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    assert outputs[0][1].count("wrote ") == 1 and "wrote " not in outputs[1][1] and not outputs[1][0].strip()
    assert json.loads((out / "report.json").read_text())["distributed"]["world_size"] == 2


def test_ctrl_c_on_the_launcher_stops_every_rank_and_leaves_no_output(tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to the launcher's whole process group: torchrun and both workers. Sent once
    fine-tuning has started, every process stops within the deadline, each rank says so in one line, and nothing
    is written: no output folder, no staging folder beside it."""
    model, data = _inputs(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           "-m", "compressor", str(model), "--data", str(data), "--eval-data", str(data), "--method", "l1",
           "--target", "0.3", "--round-to", "1", "--epochs", "500", "--batch-size", "8", "--bench-batch", "none",
           "--quantize", "none", "--device", "cpu", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # rank 0 prints a line per epoch: training has started on both ranks
            seen.append(line)
            if line.startswith("epoch 1/"):
                break
        assert seen and seen[-1].startswith("epoch 1/"), "".join(seen)[-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    # each rank says both lines; the two ranks write to one pipe at once, so their lines may interleave
    lines = rest.splitlines()
    assert lines.count("interrupted") == 2 and lines.count("no output was written") == 2, rest[-2000:]
    # torchrun's launcher itself prints a traceback ending in its SignalException on SIGINT (torch's behaviour, not
    # ours); no other traceback may appear (a worker's would mean an unhandled exception).
    assert rest.count("Traceback") == rest.count("SignalException: Process"), rest[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "net.pt"]  # nothing written, nothing staged


class _DiesOnRank1(SampleNet):
    """SampleNet whose second training forward on rank 1 kills its process (SIGKILL-like: no cleanup)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and os.environ.get("RANK") == "1":
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls >= 2:
                os._exit(9)
        return super().forward(x)


def _doomed_worker(rank: int, port: int, folder: str) -> None:
    from compressor import compress

    os.environ.update(_env(rank, port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _DiesOnRank1()
    model.load_state_dict(create_model("samplenet").state_dict())
    data = ImageDataset(torch.randint(0, 255, (32, 3, 32, 32), dtype=torch.uint8), torch.arange(32) % 10)
    start, outcome = time.monotonic(), "finished"
    try:
        compress(model, data=data, method="l1", target=0.3, round_to=1, epochs=3, batch_size=4, bench_batches=(),
                 quantize="none", reconstruct=False, bn_recalib=0, device="cpu", threads=1, dist_timeout=TIMEOUT_S,
                 out=Path(folder) / "out")
    except PeerFailed as exc:
        outcome = f"PeerFailed: {exc}"
    except BaseException as exc:  # noqa: BLE001 - the test reports whatever else happened
        outcome = f"{type(exc).__name__}: {exc}"
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"outcome": outcome,
                                                               "seconds": time.monotonic() - start}))
    os._exit(0)  # the backend's teardown would wait on the dead peer; the outcome is written


def test_a_killed_rank_makes_the_other_fail_cleanly_within_the_timeout(tmp_path: Path) -> None:
    codes = _spawn(_doomed_worker, (_port(), str(tmp_path)), deadline_s=120)
    assert codes == [0, 9]
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["outcome"].startswith("PeerFailed: distributed run failed while fine-tuning: another process died")
    assert "\n" not in seen["outcome"] and seen["seconds"] < 60 + TIMEOUT_S
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json"]  # no output, no staging folder


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("flags, words", [
    (["--method", "tucker", "--tucker-adaptive", "--epochs", "1"], "changes the model while fine-tuning"),
    (["--budget-minutes", "1"], "--budget-minutes is not supported under torchrun"),
    (["--epochs", "1", "--eval-every-minutes", "1"], "--eval-every-minutes is not supported under torchrun"),
])
def test_what_ddp_cannot_follow_is_refused_in_one_line(flags: list[str], words: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any process group is joined
    model, data = _inputs(tmp_path)
    result = CliRunner().invoke(cli.app, [str(model), "--data", str(data), *flags, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith("error: ") and words in line and "\n" not in line
    assert not (tmp_path / "out").exists()
