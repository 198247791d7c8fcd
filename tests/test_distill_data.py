"""Dataset distillation by distribution matching: the maths, the loop, the file it writes, and ``compress distill``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import tools
from compressor.data import load_dataset
from compressor.distill_data import (DSA_KINDS, ConvNet, DSAParams, apply_dsa, channel_stats, distill,
                                     distribution_matching_loss, embed, sample_dsa, save_distilled)
from compressor.errors import DataError, InputError, OutputError, UnknownNameError


def _blobs(n_per_class: int = 12, classes: int = 3, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images whose class sets the mean colour, plus noise: a distribution with per-class signal."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        colour = np.array([60 + 70 * c, 200 - 60 * c, 40 + 50 * (c % 2)], dtype=np.float64)
        xs.append(np.clip(colour + rng.normal(0, 40, (n_per_class, size, size, 3)), 0, 255).astype(np.uint8))
        ys.append(np.full(n_per_class, c, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def blobs_npz(tmp_path):
    x, y = _blobs()
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y)
    return path


# ------------------------------------------------------------------------------------------------ the maths
def test_matching_loss_is_the_sum_of_squared_mean_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(7, 5, generator=gen), torch.randn(4, 5, generator=gen)]
    syn = [torch.randn(2, 5, generator=gen), torch.randn(3, 5, generator=gen)]
    expected = sum(float(((r.mean(0) - s.mean(0)) ** 2).sum()) for r, s in zip(real, syn))
    assert float(distribution_matching_loss(real, syn)) == pytest.approx(expected, rel=1e-6)
    same_mean = [r[:2] - r[:2].mean(0) + r.mean(0) for r in real]  # other points, the same class means
    assert float(distribution_matching_loss(real, same_mean)) == pytest.approx(0.0, abs=1e-10)


def test_dsa_is_siamese_and_differentiable_for_every_kind() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 3, 16, 16), torch.randn(2, 3, 16, 16, requires_grad=True)
    for kind in DSA_KINDS:
        drawn = sample_dsa(gen, height=16, width=16, kinds=(kind,))
        assert drawn.kind == kind
        joint = apply_dsa(torch.cat([a, b]), drawn)  # one draw applied image by image == applied to the batch
        torch.testing.assert_close(joint[:3], apply_dsa(a, drawn))
        torch.testing.assert_close(joint[3:], apply_dsa(b, drawn))
        assert joint.shape == (5, 3, 16, 16)
        apply_dsa(b, drawn).sum().backward()
        assert b.grad is not None and torch.isfinite(b.grad).all()
        b.grad = None


def test_dsa_transforms_do_what_they_say() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    torch.testing.assert_close(apply_dsa(x, DSAParams("flip", (1.0,))), x.flip(3))
    torch.testing.assert_close(apply_dsa(x, DSAParams("flip", (0.0,))), x)
    shifted = apply_dsa(x, DSAParams("crop", (2.0, -1.0)))  # out[i, j] = x[i + 2, j - 1], zero outside
    torch.testing.assert_close(shifted[:, :, :6, 1:], x[:, :, 2:, :7])
    assert (shifted[:, :, 6:] == 0).all() and (shifted[:, :, :, 0] == 0).all()
    cut = apply_dsa(x + 1, DSAParams("cutout", (4.0, 4.0, 0.5)))  # a 4x4 hole centred at (4, 4)
    assert int((cut == 0).sum()) == 2 * 3 * 16 and (cut[:, :, 2:6, 2:6] == 0).all()
    torch.testing.assert_close(apply_dsa(x, DSAParams("scale", (1.0, 1.0))), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(apply_dsa(x, DSAParams("rotate", (0.0,))), x, atol=1e-4, rtol=0)
    grey = apply_dsa(x, DSAParams("color", (0.5, 0.5, 0.5)))  # no brightness shift, saturation x1, contrast x1
    torch.testing.assert_close(grey, x, atol=1e-3, rtol=0)


def test_embedding_is_the_input_of_the_last_linear_layer() -> None:
    net = ConvNet(4, width=8, input_shape=(3, 16, 16)).eval()
    x = torch.randn(5, 3, 16, 16)
    features = embed(net, x)
    assert features.shape == (5, 8 * 2 * 2)
    torch.testing.assert_close(net.classifier(features), net(x))


def test_channel_stats_scale_uint8_to_unit_range() -> None:
    x = torch.full((4, 3, 2, 2), 51, dtype=torch.uint8)
    mean, std = channel_stats(x)
    torch.testing.assert_close(mean, torch.full((3,), 0.2))
    torch.testing.assert_close(std, torch.ones(3))  # constant channels: std 1, never a division by zero


# ------------------------------------------------------------------------------------------------ the loop
def test_distill_lowers_the_matching_loss_on_the_same_networks_and_batches(blobs_npz) -> None:
    """Iteration t samples the same network and real batch whatever the learning rate, so a run with lr ~ 0 is an
    exact control: its loss is that of the untouched real starting images on the same draws."""
    real = load_dataset(blobs_npz)
    losses: dict[float, list[float]] = {0.3: [], 1e-12: []}
    runs = {lr: distill(real, images_per_class=2, iterations=100, lr=lr, width=16, batch_real=12, dsa=False, seed=3,
                        progress=lambda _it, loss, lr=lr: losses[lr].append(loss)) for lr in losses}
    optimised, control = (float(np.mean(losses[lr][-20:])) for lr in (0.3, 1e-12))
    assert optimised < 0.85 * control, (optimised, control)
    assert not torch.equal(runs[0.3].x, runs[1e-12].x)


def test_distill_is_seeded_starts_from_real_images_and_keeps_the_pixel_space(blobs_npz) -> None:
    real = load_dataset(blobs_npz)
    first = distill(real, images_per_class=2, iterations=1, lr=1e-12, width=8, batch_real=12, seed=3)
    result = distill(real, images_per_class=2, iterations=5, width=8, batch_real=12, seed=3)
    again = distill(real, images_per_class=2, iterations=5, width=8, batch_real=12, seed=3)
    torch.testing.assert_close(result.x, again.x)
    assert result.x.shape == (6, 3, 16, 16) and result.x.dtype == torch.float32
    assert result.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert float(result.x.min()) >= 0.0 and float(result.x.max()) <= 1.0
    # the untouched start is real images of the right class, rescaled to [0, 1]
    gaps = [(first.x[i:i + 1] * 255 - real.x[real.y == first.y[i]].float()).abs().amax(dim=(1, 2, 3)).min()
            for i in range(6)]
    assert max(float(g) for g in gaps) < 1e-3


def test_distilled_file_is_read_back_by_every_data_loader(tmp_path, blobs_npz) -> None:
    result = distill(blobs_npz, images_per_class=2, iterations=2, width=8, batch_real=4, seed=0)
    path = save_distilled(result, tmp_path / "d.npz")
    loaded = load_dataset(path)
    torch.testing.assert_close(loaded.x, result.x)
    assert loaded.y.tolist() == result.y.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs.npz", "d.npz"]  # no temp file left


@pytest.mark.parametrize("kwargs, error", [
    ({"images_per_class": 0}, InputError), ({"images_per_class": 13}, DataError), ({"iterations": 0}, InputError),
    ({"lr": 0.0}, InputError), ({"arch": "resnet2000"}, UnknownNameError),
])
def test_bad_settings_are_one_line_errors(blobs_npz, kwargs, error) -> None:
    settings = {"images_per_class": 2, "iterations": 1, "width": 8, **kwargs}
    with pytest.raises(error) as info:
        distill(blobs_npz, **settings)
    assert "\n" not in str(info.value)


def test_a_model_without_a_linear_classifier_is_refused(blobs_npz) -> None:
    with pytest.raises(InputError, match="nn.Linear"):
        distill(blobs_npz, images_per_class=1, iterations=1, arch="torch.nn:Identity")


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_writes_the_npz_and_reports(tmp_path, blobs_npz) -> None:
    out = tmp_path / "out" / "distilled.npz"
    run = CliRunner().invoke(tools, ["distill", str(blobs_npz), "--images-per-class", "2", "--iterations", "3",
                                     "--width", "8", "--batch-real", "4", "--no-progress", "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert "wrote" in run.output and "6 images" in run.output
    assert load_dataset(out).x.shape == (6, 3, 16, 16)
    refused = CliRunner().invoke(tools, ["distill", str(blobs_npz), "--iterations", "1", "--out", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output


@pytest.mark.parametrize("args, message", [
    (["missing.npz"], "no such file"),
    (["{data}", "--images-per-class", "0"], "--images-per-class"),
    (["{data}", "--arch", "nosuchnet"], "unknown"),
    (["{data}", "--model", "missing.pt"], "not found"),
    (["{data}", "--out-name", "distilled.txt"], ".npz"),
])
def test_cli_bad_input_exits_2_in_one_line_and_writes_nothing(tmp_path, blobs_npz, args, message) -> None:
    out = tmp_path / "o" / "distilled.npz"
    if "--out-name" in args:
        out, args = tmp_path / "o" / args[-1], args[:-2]
    argv = ["distill", *[a.format(data=blobs_npz) for a in args], "--iterations", "1", "--width", "8",
            "--no-progress", "--out", str(out)]
    run = CliRunner().invoke(tools, argv)
    assert run.exit_code == 2, run.output
    lines = run.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], run.output
    assert not out.exists() and not (tmp_path / "o").exists()


def test_output_over_the_input_is_refused(blobs_npz) -> None:
    from compressor.distill_data import check_output

    with pytest.raises(OutputError, match="input"):
        check_output(blobs_npz, inputs=[blobs_npz], overwrite=True)
