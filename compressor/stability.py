"""Linear mode connectivity: how stable a (compressed) network is to SGD noise.

Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020 (reference
code facebookresearch/open_lth): train two copies of the same weights with different SGD noise (batch order and
augmentation), evaluate the error of the weights on the straight line between them,

.. math::
    \\theta(\\alpha) = (1 - \\alpha)\\, \\theta_A + \\alpha\\, \\theta_B, \\qquad \\alpha \\in [0, 1],

and report the *error barrier* (their "instability"): the largest error on the path minus the mean of the two
endpoints' errors. A barrier near zero means the two runs ended in one linearly connected minimum: the network is
stable to SGD noise. McDermott & Cummings (arXiv 2310.18769) measure it for sparse subnetworks.

BatchNorm running statistics of an interpolated network describe neither endpoint, so they are re-estimated on
training images at every point (Jordan et al., "REPAIR", ICLR 2023, section 3; the endpoints are treated the same
way, so the barrier compares like with like).

Examples
--------
>>> result = stability("compressed.pt", data="train.npz", eval_data="test.npz", normalize="imagenet",
...                    epochs=2)  # doctest: +SKIP
>>> result.barrier  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import ImageDataset, calibration_subset, check_dataset, load_dataset, make_loader
from .errors import InputError
from .io import check_out_folder, load_model, publish, staging
from .methods.masks import MaskKeeper, masked_layers, sparsity
from .evaluation import evaluate, recalibrate_bn
from .training import TrainConfig, Trainer

__all__ = ["OUTPUT_FILES", "PLOT_EXTRA", "StabilityResult", "check_out_dir", "error_barrier", "interpolate_state",
           "interpolation_coefficients", "linear_path_errors", "render_markdown", "save_stability", "stability"]

OUTPUT_FILES = ("stability.json", "stability.md", "stability.png")
PLOT_EXTRA = 'the stability plot needs matplotlib: pip install "compressor[bench]" (or pass --no-plot)'


# ------------------------------------------------------------------------------------------------ the maths
def interpolation_coefficients(points: int) -> list[float]:
    """``points`` evenly spaced coefficients :math:`\\alpha_i = i / (n - 1)` from 0 to 1 (both endpoints included)."""
    if not isinstance(points, int) or isinstance(points, bool) or points < 2:
        raise InputError(f"--points must be an integer >= 2 (both endpoints are evaluated); got {points!r}")
    return [i / (points - 1) for i in range(points)]


def interpolate_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """The state dict :math:`(1 - \\alpha)\\,\\theta_A + \\alpha\\,\\theta_B` of every floating-point tensor; integer
    tensors (BatchNorm's ``num_batches_tracked``) are taken from ``a``.

    Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020, section 2.
    """
    if a.keys() != b.keys():
        raise InputError("the two networks have different parameters; linear interpolation needs one architecture")
    return {k: torch.lerp(a[k], b[k], alpha) if a[k].is_floating_point() else a[k].clone() for k in a}


def error_barrier(errors: Sequence[float]) -> float:
    """The error barrier (instability) of a path whose errors are ``errors[0] ... errors[-1]``:

    .. math::
        B = \\max_i \\mathcal{E}(\\alpha_i) - \\tfrac12 \\big(\\mathcal{E}(0) + \\mathcal{E}(1)\\big)

    Frankle et al., ICML 2020, definition 1 ("instability": the maximum increase in error along the linear path
    over the mean of the endpoints' errors). Never negative: the endpoints are on the path.
    """
    if len(errors) < 2:
        raise ValueError("a path needs at least its two endpoints")
    return max(errors) - 0.5 * (errors[0] + errors[-1])


def linear_path_errors(model_a: nn.Module, model_b: nn.Module, *, alphas: Sequence[float],
                       bn_loader: Any, eval_loader: Any,
                       progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Top-1 error of :math:`\\theta(\\alpha)` for every ``alpha`` (see :func:`interpolate_state`), BatchNorm
    statistics re-estimated on ``bn_loader`` at every point (:func:`compressor.training.recalibrate_bn`)."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    errors = []
    for i, alpha in enumerate(alphas):
        probe.load_state_dict(interpolate_state(state_a, state_b, alpha))
        recalibrate_bn(probe, bn_loader)
        errors.append(1.0 - evaluate(probe, eval_loader))
        if progress is not None:
            progress(i + 1, alpha)
    return errors


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class StabilityResult:
    """What :func:`stability` measured: ``errors[i]`` is the top-1 error at ``alphas[i]``; ``barrier`` the error
    barrier; ``accuracy_a`` / ``accuracy_b`` the endpoints' top-1 (BatchNorm re-estimated like every point);
    ``training`` one record per copy (noise seed, steps, seconds, last loss); ``settings`` the run's options."""

    alphas: list[float]
    errors: list[float]
    barrier: float
    accuracy_a: float
    accuracy_b: float
    evaluated_on: str
    training: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)


class _Steps:
    """Exactly ``steps`` batches of ``loader``, iterating it again (a new shuffle) whenever it runs out: a step budget
    for the one Trainer (``epochs=1`` over this), whose cosine schedule then spans the ``steps``."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        done = 0
        while done < self.steps:
            for batch in self.loader:
                if done == self.steps:
                    return
                yield batch
                done += 1


def _budget(epochs: int | None, steps: int | None) -> tuple[int, int | None]:
    if (epochs is None) == (steps is None):
        raise InputError("give the training budget of each copy as --epochs N or --steps N (one of them)")
    value, flag = (epochs, "--epochs") if epochs is not None else (steps, "--steps")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{flag} must be a positive integer; got {value!r}")
    return (epochs, None) if epochs is not None else (1, steps)


def _datasets(data: Any, eval_data: Any) -> tuple[ImageDataset, ImageDataset | None]:
    train = data if isinstance(data, ImageDataset) else load_dataset(data)
    test = eval_data if eval_data is None or isinstance(eval_data, ImageDataset) else load_dataset(eval_data)
    return train, test


def _seeds(seeds: Sequence[int]) -> tuple[int, int]:
    if len(seeds) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise InputError(f"give two integer noise seeds, one per copy; got {seeds!r}")
    return int(seeds[0]), int(seeds[1])


def stability(model: str | os.PathLike[str] | nn.Module, *, data: Any, eval_data: Any = None, arch: str | None = None,
              trust_pickle: bool = False, normalize: str = "none", epochs: int | None = None,
              steps: int | None = None, lr: float = 0.01, optimizer: str = "sgd", weight_decay: float = 5e-4,
              batch_size: int = 128, augment: bool = True, seeds: Sequence[int] = (1, 2), points: int = 21,
              bn_images: int = 1024, eval_images: int = 1000, device: str = "auto", train_progress: bool = True,
              progress: Callable[[int, float], None] | None = None) -> StabilityResult:
    """Train two copies of ``model`` with different SGD noise and measure the error barrier between them.

    Parameters
    ----------
    model : path or nn.Module
        Any checkpoint :func:`compressor.io.load_model` reads (``compressed.pt`` included: pruned, factorised, ...).
        Weight masks it carries (``sparsity_mask`` buffers of ``--method imp --imp-granularity weight``) stay in
        force while both copies train (:class:`~compressor.methods.masks.MaskKeeper`).
    data, eval_data : path spec or ImageDataset
        Training images (required), evaluation images (default: ``eval_images`` class-balanced images of ``data``).
    epochs, steps : int
        Training budget of each copy: exactly one of them.
    lr, optimizer, weight_decay, batch_size, augment
        The Trainer's recipe (cosine schedule from ``lr``), the same for both copies.
    seeds : (int, int)
        SGD noise of copy A and copy B: batch order, augmentation and ``torch.manual_seed``. Equal seeds give two
        identical runs (barrier 0).
    points : int
        Interpolation coefficients, endpoints included (Frankle et al. use 30; 21 steps of 0.05 by default).
    bn_images : int
        Images of ``data`` on which BatchNorm statistics are re-estimated at every point.
    """
    if data is None:
        raise InputError("compress stability trains two copies of the model; pass --data (training images)")
    budget_epochs, budget_steps = _budget(epochs, steps)
    seed_a, seed_b = _seeds(seeds)
    alphas = interpolation_coefficients(points)
    config = TrainConfig(epochs=budget_epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay)  # checks values
    train, test = _datasets(data, eval_data)
    loaded = None if isinstance(model, nn.Module) else load_model(model, arch=arch, trust_pickle=trust_pickle)
    base: nn.Module = model if isinstance(model, nn.Module) else loaded.model  # type: ignore[union-attr]
    shape = (loaded.input_shape if loaded is not None else None) or train.image_shape
    from .pipeline import resolve_device  # local: the pipeline imports every method

    dev = resolve_device(device)
    with torch.no_grad():
        num_classes = int(base.eval()(torch.zeros((1, *shape))).shape[1])
    for ds, flag in ((train, "--data"), (test, "--eval-data")):
        if ds is not None:
            check_dataset(ds, input_shape=shape, num_classes=num_classes, name=flag)
    evaluated_on = f"--eval-data ({len(test)} images)" if test is not None else f"--data ({eval_images} images)"
    test = test if test is not None else calibration_subset(train, eval_images, seed=0)
    masked = [name for name, _ in masked_layers(base)]
    copies, records = [], []
    for seed in (seed_a, seed_b):
        net = copy.deepcopy(base).to(dev)
        loader: Any = make_loader(train, batch_size=batch_size, normalize=normalize, shuffle=True, augment=augment,
                                  seed=seed)
        if budget_steps is not None:
            loader = _Steps(loader, budget_steps)
        # a weight-IMP model carries its masks as buffers: both copies train with them in force (masked gradients and
        # weights zeroed at every step), so the path joins two networks of the same sparse support
        keep = [MaskKeeper({"kind": "mask", "layers": masked})] if masked else []
        done = Trainer(replace(config, seed=seed), device=dev, progress=train_progress).fit(net, loader,
                                                                                            callbacks=keep)
        copies.append(done.model)
        record = {"seed": seed, "epochs": done.epochs, "steps": done.epochs * len(loader),
                  "seconds": round(done.seconds, 2), "last_loss": done.history[-1]["loss"]}
        if masked:
            record["sparsity"] = sparsity(done.model)["overall"]
        records.append(record)
    bn_loader = make_loader(calibration_subset(train, bn_images, seed=0), batch_size=batch_size, normalize=normalize)
    eval_loader = make_loader(test, batch_size=batch_size, normalize=normalize)
    errors = linear_path_errors(copies[0], copies[1], alphas=alphas, bn_loader=bn_loader, eval_loader=eval_loader,
                                progress=progress)
    settings = {"model": str(model) if loaded is not None else type(model).__name__, "normalize": str(normalize),
                "epochs": epochs, "steps": steps, "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay,
                "batch_size": batch_size, "augment": augment, "points": points, "bn_images": bn_images,
                "device": str(dev), "masked_layers": len(masked)}
    return StabilityResult(alphas=alphas, errors=errors, barrier=error_barrier(errors), accuracy_a=1.0 - errors[0],
                           accuracy_b=1.0 - errors[-1], evaluated_on=evaluated_on, training=records,
                           settings=settings)



# --------------------------------------------------------------------------------------------------- outputs
def check_out_dir(out: str | os.PathLike[str], *, overwrite: bool = False, plot: bool = True) -> Path:
    """Fail before any work when ``out`` cannot take the outputs: a file, already holding them (without
    ``overwrite``), not writable, or a plot is wanted without matplotlib (:data:`PLOT_EXTRA`)."""
    path = check_out_folder(out, OUTPUT_FILES, overwrite=overwrite)
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError(PLOT_EXTRA) from None
    return path


def render_markdown(result: StabilityResult) -> str:
    """The markdown report: summary, training of both copies, and the error at every coefficient."""
    s = result.settings
    budget = f"{s['epochs']} epochs" if s["epochs"] is not None else f"{s['steps']} steps"
    lines = [
        "# Linear mode connectivity", "",
        f"Model `{s['model']}`: two copies trained for {budget} each (lr {s['lr']:g}, {s['optimizer']}, batch "
        f"{s['batch_size']}, augmentation {'on' if s['augment'] else 'off'}) with noise seeds "
        f"{result.training[0]['seed']} and {result.training[1]['seed']}; error on {result.evaluated_on} at "
        f"{len(result.alphas)} points of the straight line between them, BatchNorm statistics re-estimated on "
        f"{s['bn_images']} training images at every point." + (
            f" Weight masks of {s['masked_layers']} layers kept in force while training (zeros in conv+linear "
            f"weights after training: {100 * result.training[0]['sparsity']:.2f} % and "
            f"{100 * result.training[1]['sparsity']:.2f} %)." if s.get("masked_layers") else ""), "",
        "| measure | value |", "| --- | --- |",
        f"| error barrier (max error on the path - mean of the endpoints) | {100 * result.barrier:.2f} points |",
        f"| top-1 of copy A (alpha = 0) | {100 * result.accuracy_a:.2f} % |",
        f"| top-1 of copy B (alpha = 1) | {100 * result.accuracy_b:.2f} % |",
        f"| highest error on the path | {100 * max(result.errors):.2f} % at alpha = "
        f"{result.alphas[result.errors.index(max(result.errors))]:.2f} |", "",
        "| alpha | error (%) |", "| --- | --- |",
        *(f"| {a:.2f} | {100 * e:.2f} |" for a, e in zip(result.alphas, result.errors)), "",
    ]
    return "\n".join(lines)


def _plot(result: StabilityResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    try:
        ax.plot(result.alphas, [100 * e for e in result.errors], marker="o", markersize=3)
        ax.set_xlabel("interpolation coefficient alpha (0 = copy A, 1 = copy B)")
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(f"error barrier {100 * result.barrier:.2f} points")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def save_stability(result: StabilityResult, out: str | os.PathLike[str], *, plot: bool = True,
                   overwrite: bool = False) -> dict[str, Path]:
    """Write ``stability.json``, ``stability.md`` and (with ``plot``) ``stability.png`` into ``out``: staged in a
    temporary folder beside it and moved in only when all were written, so a failure leaves no partial file."""
    out = check_out_dir(out, overwrite=overwrite, plot=plot)
    with staging(out, prefix=".stability-") as stage:
        (stage / "stability.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        (stage / "stability.md").write_text(render_markdown(result))
        if plot:
            _plot(result, stage / "stability.png")
        return publish(stage, out, OUTPUT_FILES)
