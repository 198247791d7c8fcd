"""Tests for compressor.training: the Trainer (learning, determinism, the LR schedule, distillation, modes, interrupts,
callbacks), evaluation and BatchNorm recalibration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.data import ImageDataset, make_loader
from compressor.errors import DataError, InputError
from compressor.evaluation import evaluate, recalibrate_bn
from compressor.training import (
    Callback,
    TrainConfig,
    Trainer,
    TrainResult,
    TrainState,
    cosine_lr,
    distillation_loss,
)

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _blobs(n: int = 256, seed: int = 0) -> ImageDataset:
    """Four classes told apart by which quadrant of a 1x8x8 image is bright (plus noise): easy to learn."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.rand((n, 1, 8, 8), generator=gen) * 0.5
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.5
    return ImageDataset(x, y)


def _net(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 4))


def _loader(ds: ImageDataset, seed: int = 0, shuffle: bool = True):
    return make_loader(ds, batch_size=32, normalize=None, shuffle=shuffle, seed=seed)


def fit(model: nn.Module, loader, *, teacher: nn.Module | None = None, eval_loader=None, progress: bool = True,
        log=None, callbacks=(), device=None, **config) -> TrainResult:
    """One Trainer run: ``config`` are TrainConfig fields (``epochs`` is required there)."""
    trainer = Trainer(TrainConfig(**config), device=device, progress=progress, log=log, callbacks=callbacks)
    return trainer.fit(model, loader, teacher=teacher, eval_loader=eval_loader)


def test_loss_decreases_and_accuracy_improves() -> None:
    train, test = _blobs(256, seed=0), _blobs(128, seed=1)
    model = _net()
    before = evaluate(model, _loader(test, shuffle=False))
    lines: list[str] = []
    result = fit(model, _loader(train), epochs=4, lr=0.05, eval_loader=_loader(test, shuffle=False),
                      log=lines.append)
    hist = result.history
    assert isinstance(result, TrainResult) and result.model is model and result.epochs == 4 and len(hist) == 4
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert hist[-1]["train_acc"] > hist[0]["train_acc"] and hist[-1]["eval_acc"] > max(0.9, before + 0.3)
    assert hist[-1]["eval_acc"] == pytest.approx(evaluate(model, _loader(test, shuffle=False)))
    assert hist[0]["lr"] > hist[-1]["lr"] > 0 and result.device == "cpu" and result.amp is False
    assert set(hist[0]) == {"epoch", "loss", "train_acc", "eval_acc", "lr", "seconds"}
    assert len(lines) == 4 and lines[0].startswith("epoch 1/4") and "eval" in lines[0]


def test_adamw_and_progress_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    result = fit(_net(), _loader(_blobs(64)), epochs=2, lr=0.01, optimizer="adamw")
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss" in err and "lr" in err
    assert result.history[1]["loss"] < result.history[0]["loss"] and result.history[0]["eval_acc"] is None
    fit(_net(), _loader(_blobs(64)), epochs=1, progress=False)
    assert capsys.readouterr().err == ""


def test_same_seed_gives_identical_weights() -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = nn.Sequential(_net(), nn.Dropout(0.3))  # dropout draws from the seeded global RNG
        fit(model, make_loader(_blobs(96), batch_size=32, normalize=None, shuffle=True, augment=True, seed=7),
                 epochs=2, seed=seed, progress=False)
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_cosine_lr_endpoints_warmup_and_monotonic_decay() -> None:
    assert cosine_lr(0, 100, 0.1, 0) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 0.1, 0) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1, 0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(500, 100, 0.1, 0) == 0.0
    values = [cosine_lr(s, 100, 0.1, 0) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    warm = [cosine_lr(s, 100, 0.1, 10) for s in range(10)]
    assert warm[0] == pytest.approx(0.01) and all(a < b for a, b in zip(warm, warm[1:]))
    assert cosine_lr(10, 100, 0.1, 10) == pytest.approx(0.1) and cosine_lr(100, 100, 0.1, 10) == pytest.approx(0.0)


def test_distillation_loss_formula() -> None:
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    T = 3.0
    kl = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = 0.25 * T * T * kl + 0.75 * F.cross_entropy(s, y)
    assert distillation_loss(s, t, y, temperature=T, alpha=0.25) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(t, t, y, temperature=T, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_pulls_student_toward_teacher() -> None:
    data = _blobs(128)
    teacher = _net(seed=1, width=6)
    with torch.no_grad():
        teacher[-1].weight.mul_(20.0)  # confident, arbitrary outputs: far from any fresh student
    teacher.train()  # finetune must put it in eval mode itself, and give the train mode back
    x = data.x

    def kl_to_teacher(student: nn.Module) -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student.eval()(x), 1), F.log_softmax(teacher.eval()(x), 1),
                                  reduction="batchmean", log_target=True))

    student = _net(seed=2)
    before = kl_to_teacher(student)
    teacher.train()
    result = fit(student, _loader(data), epochs=4, lr=0.05, teacher=teacher, distill_alpha=1.0,
                      distill_temperature=2.0, progress=False)
    assert teacher.training and all(p.grad is None for p in teacher.parameters())
    assert before > 0.5 and kl_to_teacher(student) < 0.5 * before
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_epochs_zero_is_a_noop() -> None:
    model = _net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, _loader(_blobs(32)), epochs=0)
    assert result.epochs == 0 and result.history == [] and result.seconds == 0.0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_evaluate_restores_modes_and_counts_correctly() -> None:
    model = _net()
    model.train()
    model[1].eval()  # a mixed state (frozen BatchNorm) must come back exactly
    ds = _blobs(40)
    acc = evaluate(model, _loader(ds, shuffle=False), device="cpu")
    with torch.no_grad():
        expected = (model.eval()(ds.x).argmax(1) == ds.y).float().mean().item()
    assert acc == pytest.approx(expected)
    model.train()
    model[1].eval()
    evaluate(model, _loader(ds, shuffle=False))
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(DataError, match="no batches"):
        evaluate(model, [])


def test_fit_restores_modes_and_keyboard_interrupt_propagates() -> None:
    model = _net().eval()
    batches = list(_loader(_blobs(64)))

    class Interrupting:
        def __len__(self) -> int:
            return len(batches)

        def __iter__(self):
            yield batches[0]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model, Interrupting(), epochs=2, progress=False)
    assert not model.training and not any(m.training for m in model.modules())
    fit(model, batches, epochs=1, progress=False)
    assert not model.training


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": -1}, "epochs"),
    ({"epochs": 1, "lr": 0.0}, "learning rate"),
    ({"epochs": 1, "lr": math.nan}, "learning rate"),
    ({"epochs": 1, "optimizer": "adam"}, "unknown optimizer 'adam'"),
    ({"epochs": 1, "distill_alpha": 1.5}, "alpha"),
    ({"epochs": 1, "momentum": 1.0}, "momentum"),
    ({"epochs": 1, "weight_decay": -1e-4}, "weight decay"),
    ({"epochs": True}, "epochs"),
])
def test_train_config_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        TrainConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_fit_rejects_empty_loader_and_reports_divergence() -> None:
    empty = make_loader(_blobs(8), batch_size=16, normalize=None, drop_last=True)
    with pytest.raises(DataError, match="no batches"):
        fit(_net(), empty, epochs=1)
    with pytest.raises(ValueError, match="diverged.*lower the learning rate"):
        fit(_net(), _loader(_blobs(64)), epochs=1, lr=1e30, progress=False)


@pytest.mark.gpu
def test_fit_on_cuda_with_amp() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA; none available")
    result = fit(_net(), _loader(_blobs(256)), epochs=3, lr=0.05, device="cuda", progress=False)
    assert result.amp is True and result.device.startswith("cuda")
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_recalibrate_bn_measures_the_new_statistics_and_touches_nothing_else() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 1, 8, 8))
    model.eval()
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    x = torch.randn(64, 1, 8, 8) * 2 + 1
    loader = [(x[:32], torch.zeros(32)), (x[32:], torch.zeros(32))]
    assert recalibrate_bn(model, loader) == 64
    with torch.no_grad():  # the cumulative average over batches of each batch's statistics
        batches = [model[0](xb) for xb, _ in loader]
    mean = torch.stack([f.mean((0, 2, 3)) for f in batches]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, var, atol=1e-4, rtol=1e-4)
    assert not model.training and not bn.training and bn.momentum == 0.1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(DataError, match="no images"):
        recalibrate_bn(model, [])


# ------------------------------------------------------------------------------------------------- callbacks
class Recorder(Callback):
    """Logs every hook with the step/epoch it saw; checks what each hook is promised."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def _log(self, hook: str, state: TrainState) -> None:
        self.calls.append((hook, state.step, state.epoch))

    def on_train_start(self, state: TrainState) -> None:
        assert state.optimizer is None and state.total_steps == state.config.epochs * state.steps_per_epoch
        self._log("train_start", state)

    def on_step_start(self, state: TrainState) -> None:
        assert state.lr == cosine_lr(state.step, state.total_steps, state.config.lr)
        assert state.optimizer.param_groups[0]["lr"] == state.lr
        self._log("step_start", state)

    def on_after_backward(self, state: TrainState) -> None:
        assert all(p.grad is not None for p in state.model.parameters()) and state.loss is not None
        self._log("after_backward", state)

    def on_step_end(self, state: TrainState) -> None:
        assert all(p.grad is None for p in state.model.parameters())
        self._log("step_end", state)

    def on_epoch_end(self, state: TrainState) -> None:
        assert state.history[-1]["epoch"] == state.epoch
        state.history[-1]["extra"] = state.step  # callbacks may add keys to the epoch record
        self._log("epoch_end", state)

    def on_train_end(self, state: TrainState) -> None:
        self._log("train_end", state)


def test_callbacks_see_every_hook_in_order() -> None:
    recorder = Recorder()
    batches = list(_loader(_blobs(64)))  # 2 batches per epoch
    result = fit(_net(), batches, epochs=2, progress=False, callbacks=[recorder])
    step = ["step_start", "after_backward", "step_end"]
    expected = [("train_start", 0, 0)]
    for epoch, steps in ((1, (0, 1)), (2, (2, 3))):
        expected += [(hook, s, epoch) for s in steps for hook in step] + [("epoch_end", steps[-1] + 1, epoch)]
    expected.append(("train_end", 4, 2))
    assert recorder.calls == expected
    assert [h["extra"] for h in result.history] == [2, 4]
    second = Recorder()
    Trainer(TrainConfig(epochs=1), progress=False, callbacks=[Recorder()]).fit(_net(), batches, callbacks=[second])
    assert second.calls[0][0] == "train_start" and second.calls[-1][0] == "train_end"
    none = Recorder()
    fit(_net(), batches, epochs=0, callbacks=[none])
    assert none.calls == []


def test_callbacks_may_replace_the_model_and_the_optimizer() -> None:
    """Wrap at the start (the optimizer is built over the wrapper's parameters), unwrap at the end."""
    class Scaled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.gain = inner, nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gain * self.inner(x)

    class Wrap(Callback):
        def on_train_start(self, state: TrainState) -> None:
            state.model = Scaled(state.model)

        def on_step_start(self, state: TrainState) -> None:
            if state.step == 1:  # a callback may rebuild the optimizer; the loop reads state.optimizer
                state.optimizer = torch.optim.SGD(state.model.parameters(), lr=state.lr)

        def on_train_end(self, state: TrainState) -> None:
            self.gain = float(state.model.gain.detach())
            state.model = state.model.inner

    inner, wrap = _net(), Wrap()
    before = inner[-1].weight.detach().clone()
    result = fit(inner, list(_loader(_blobs(64))), epochs=2, lr=0.1, progress=False, callbacks=[wrap])
    assert result.model is inner and wrap.gain != 1.0 and not torch.equal(before, inner[-1].weight)


def test_sampler_epoch_and_quiet_workers(capsys: pytest.CaptureFixture[str]) -> None:
    """A distributed run: the sampler is told each epoch (new shuffle per epoch); only the main process prints."""
    batches = list(_loader(_blobs(64)))

    class Sampler:
        epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    class WithSampler(list):
        sampler = Sampler()

    loader = WithSampler(batches)
    Trainer(TrainConfig(epochs=3), is_main=False).fit(_net(), loader)
    assert loader.sampler.epochs == [1, 2, 3] and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- time budget
class _FakeClock:
    """Advances one second per training step (a callback ticks it), so a budget in seconds is a budget in steps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Tick(Callback):
    def __init__(self, clock: _FakeClock, lrs: list[float]) -> None:
        self.clock, self.lrs = clock, lrs

    def on_step_start(self, state) -> None:
        self.lrs.append(state.lr)

    def on_step_end(self, state) -> None:
        self.clock.now += 1.0


def test_a_time_budget_stops_in_time_with_the_schedule_fitted_to_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    loader = [(torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,))) for _ in range(4)]  # 4 steps per epoch
    clock, lrs = _FakeClock(), []
    result = Trainer(TrainConfig(epochs=1000, lr=0.1, budget_seconds=10.0), device="cpu", callbacks=[_Tick(clock, lrs)],
                     progress=False, clock=clock).fit(model, loader)
    assert len(lrs) == 10 and clock.now == 110.0  # stopped on the step that spent the budget
    assert result.epochs == 3 and len(result.history) == 3  # 4 + 4 + 2 steps: the last epoch is partial
    assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)), rel=1e-3)  # 9 s of 10 spent


def test_a_bad_time_budget_is_a_one_line_error() -> None:
    with pytest.raises(InputError, match="time budget must be a positive number"):
        TrainConfig(epochs=1, budget_seconds=0.0)


@pytest.mark.parametrize(("args", "message"), [
    (["--budget-minutes", "0"], "--budget-minutes must be a positive number of minutes"),
    (["--budget-minutes", "5", "--epochs", "2"], "give --epochs or --budget-minutes, not both"),
    (["--budget-minutes", "5", "--eval-every-minutes", "0"], "--eval-every-minutes must be a positive number"),
    (["--eval-every-minutes", "1"], "--eval-every-minutes records top-1 while fine-tuning: add --budget-minutes"),
])
def test_bad_budget_minutes_is_a_one_line_error_and_writes_nothing(args, message, tmp_path) -> None:
    from typer.testing import CliRunner

    from compressor import cli

    result = CliRunner().invoke(cli.app, [str(SAMPLES / "samplenet.pt"), "--arch", "samplenet", *args,
                                          "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_budget_minutes_fine_tunes_through_compress_and_reports_what_ran() -> None:
    from compressor import compress

    report = compress(str(SAMPLES / "samplenet.pt"), arch="samplenet", data=str(SAMPLES / "shapes_train_set.npz"),
                      eval_data=str(SAMPLES / "shapes_test_set.npz"), normalize="0.5,0.5,0.5/0.5,0.5,0.5",
                      method="l1", target=0.3, budget_minutes=0.02, eval_every_minutes=0.005, quantize="none",
                      bench_batches=(), out=None).report
    finetune = report["finetune"]
    assert finetune["budget_minutes"] == 0.02 and finetune["epochs"] >= 1 and len(finetune["history"]) >= 1
    curve = finetune["curve"]  # top-1 every 0.3 s of training (at most 3 before the budget ends), then the final one
    assert finetune["eval_every_minutes"] == 0.005 and curve[-1]["final"] and 1 <= len(curve) <= 4
    assert all(p["minutes"] >= 0.005 * i for i, p in enumerate(curve, 1))
    assert [p["minutes"] for p in curve] == sorted(p["minutes"] for p in curve) and curve[-1]["minutes"] >= 0.02
    assert curve[-1]["top1"] == report["compressed"]["accuracy"]
    assert finetune["history"][-1]["lr"] < 0.01  # the schedule was run down with the time


class _CostlyEval(list):
    """An evaluation loader whose every pass costs ``cost`` seconds of the fake clock."""

    def __init__(self, batches: list, clock: _FakeClock, cost: float) -> None:
        super().__init__(batches)
        self.clock, self.cost, self.passes = clock, cost, 0

    def __iter__(self):
        self.clock.now += self.cost
        self.passes += 1
        return super().__iter__()


def test_top1_is_recorded_at_fixed_training_times_and_its_evaluations_spend_no_budget() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    loader = [(torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,))) for _ in range(20)]  # 20 steps per epoch
    clock, lrs = _FakeClock(), []
    evals = _CostlyEval(loader[:1], clock, cost=5.0)
    config = TrainConfig(epochs=1000, lr=0.1, budget_seconds=10.0, eval_every_seconds=3.0)
    result = Trainer(config, device="cpu", callbacks=[_Tick(clock, lrs)], progress=False,
                     clock=clock).fit(model, loader, eval_loader=evals)
    # 1 s per step: points after 3, 6 and 9 s of training, each evaluation 5 s that the budget does not count, so
    # the budget still ends after 10 steps; the final point is the (partial) epoch's own evaluation
    assert len(lrs) == 10 and evals.passes == 3 + 1 and result.epochs == 1
    assert [(p["minutes"] * 60, p["epoch"], p["step"], p.get("final", False)) for p in result.curve] == [
        pytest.approx((3.0, 1, 3, False), abs=0.01), pytest.approx((6.0, 1, 6, False), abs=0.01),
        pytest.approx((9.0, 1, 9, False), abs=0.01), pytest.approx((10.0, 1, 10, True), abs=0.01)]
    assert all(0.0 <= p["top1"] <= 1.0 for p in result.curve)
    assert result.curve[-1]["top1"] == result.history[-1]["eval_acc"]
    assert clock.now == pytest.approx(100 + 10 + 4 * 5.0)
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)), rel=1e-3)  # 9 s of training spent


def test_the_curve_needs_evaluation_data_and_a_positive_interval() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    loader = [(torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,))) for _ in range(2)]
    result = Trainer(TrainConfig(epochs=2, eval_every_seconds=1e-9), device="cpu", progress=False).fit(model, loader)
    assert result.curve == []  # nothing to evaluate on: no curve, no error
    with_eval = Trainer(TrainConfig(epochs=2, eval_every_seconds=1e-9), device="cpu",
                        progress=False).fit(model, loader, eval_loader=loader)
    assert [p["step"] for p in with_eval.curve] == [1, 2, 3, 4, 4] and with_eval.curve[-1]["final"]
    with pytest.raises(InputError, match="evaluation interval must be a positive number"):
        TrainConfig(epochs=1, eval_every_seconds=0.0)
