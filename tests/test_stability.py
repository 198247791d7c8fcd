"""Linear mode connectivity: interpolation, the barrier, the two training runs, and ``compress stability``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compressor.cli import tools
from compressor.data import ImageDataset, make_loader
from compressor.errors import InputError
from compressor.io import compressed_payload
from compressor.models import create_model
from compressor.stability import (OUTPUT_FILES, error_barrier, interpolate_state, interpolation_coefficients,
                                  linear_path_errors, stability)
from compressor.evaluation import evaluate

from .conftest import SAMPLES


def _tiny_data(tmp_path, n: int = 48) -> str:
    """The first ``n`` images of the bundled shapes training set, as a .npz (the test reads them from here)."""
    with np.load(SAMPLES / "shapes_train_set.npz") as archive:
        x, y = archive["x"][:n], archive["y"][:n]
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def _samplenet_file(tmp_path) -> str:
    path = tmp_path / "net.pt"
    torch.save({"state_dict": torch.load(SAMPLES / "samplenet.pt", weights_only=True)["state_dict"],
                "arch": "samplenet"}, path)
    return str(path)


# ------------------------------------------------------------------------------------------------ the maths
def test_barrier_is_the_peak_over_the_mean_of_the_endpoints() -> None:
    assert error_barrier([0.1, 0.3, 0.5, 0.2, 0.3]) == pytest.approx(0.5 - 0.2)
    assert error_barrier([0.2, 0.2, 0.2]) == 0.0
    assert error_barrier([0.1, 0.05, 0.3]) == pytest.approx(0.3 - 0.2)  # the peak may be an endpoint


def test_coefficients_include_both_endpoints() -> None:
    assert interpolation_coefficients(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(InputError, match="--points"):
        interpolation_coefficients(1)


def test_interpolation_is_linear_in_floats_and_keeps_counters_of_the_first() -> None:
    torch.manual_seed(0)
    a, b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    b.weight.data.fill_(3.0)
    b.running_mean.fill_(2.0)
    b.num_batches_tracked.fill_(7)
    mid = interpolate_state(a.state_dict(), b.state_dict(), 0.25)
    torch.testing.assert_close(mid["weight"], torch.full((3,), 1.5))  # 0.75 * 1 + 0.25 * 3
    torch.testing.assert_close(mid["running_mean"], torch.full((3,), 0.5))
    assert int(mid["num_batches_tracked"]) == 0
    for alpha, end in ((0.0, a), (1.0, b)):
        got = interpolate_state(a.state_dict(), b.state_dict(), alpha)
        torch.testing.assert_close(got["weight"], end.weight.data)


def test_path_errors_reestimate_batchnorm_at_every_point() -> None:
    torch.manual_seed(0)
    model = create_model("samplenet")
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    data = ImageDataset(x, torch.randint(0, 10, (32,)))
    loader = make_loader(data, batch_size=16, normalize=None)
    stale = create_model("samplenet")
    stale.load_state_dict(model.state_dict())
    for m in stale.modules():  # wrong statistics: the path must not use them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(50.0)
    errors = linear_path_errors(stale, stale, alphas=[0.0, 1.0], bn_loader=loader, eval_loader=loader)
    from compressor.evaluation import recalibrate_bn

    recalibrate_bn(model, loader)
    assert errors == [pytest.approx(1 - evaluate(model, loader))] * 2


# ------------------------------------------------------------------------------------------------ the run
def test_identical_noise_gives_zero_barrier_and_different_noise_different_runs(tmp_path) -> None:
    data = _tiny_data(tmp_path)
    common = dict(data=data, normalize="0.5,0.5,0.5/0.5,0.5,0.5", steps=3, batch_size=16, points=3, bn_images=32,
                  eval_images=48, lr=0.05, device="cpu", train_progress=False)
    same = stability(_samplenet_file(tmp_path), seeds=(4, 4), **common)
    assert same.barrier == 0.0 and same.errors == [same.errors[0]] * 3
    assert same.training[0]["last_loss"] == same.training[1]["last_loss"]
    assert same.training[0]["steps"] == 3 and same.evaluated_on.startswith("--data")
    other = stability(_samplenet_file(tmp_path), seeds=(4, 5), **common)
    assert other.training[0]["last_loss"] != other.training[1]["last_loss"]
    assert other.barrier >= 0.0 and other.accuracy_a == pytest.approx(1 - other.errors[0])


def test_a_compressed_model_written_by_the_tool_is_accepted(tmp_path) -> None:
    from compressor.pruning import engine

    torch.manual_seed(0)
    model = create_model("samplenet").eval()
    example = torch.zeros(1, 3, 32, 32)
    graph = engine.build_graph(model, example)
    groups = engine.discover_groups(model, graph)
    engine.apply_keep(model, graph, groups, {g.root: torch.rand(g.channels) for g in groups},
                      engine.uniform_keep(groups, 0.5, min_keep=0.1, round_to=1))
    path = tmp_path / "compressed.pt"
    torch.save(compressed_payload(model, arch="samplenet", input_shape=(3, 32, 32),
                                  transforms=[{"kind": "prune", "history": graph.pruning_history()}],
                                  meta={"num_classes": 10}), path)
    result = stability(path, data=_tiny_data(tmp_path), steps=2, batch_size=16, points=3, bn_images=16,
                       eval_images=16, seeds=(1, 2), device="cpu", train_progress=False)
    assert len(result.errors) == 3 and all(0.0 <= e <= 1.0 for e in result.errors)


def test_weight_masks_stay_in_force_on_both_copies_and_the_barrier_is_still_measured(tmp_path, monkeypatch) -> None:
    import compressor.stability as stab
    from compressor.methods.masks import MASK, apply_masks, global_magnitude_masks, prunable_layers

    torch.manual_seed(0)
    model = create_model("samplenet").eval()
    names = list(prunable_layers(model))
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    apply_masks(model, global_magnitude_masks(model, names, count=int(0.7 * total)))
    path = tmp_path / "compressed.pt"  # as --method imp --imp-granularity weight writes it: buffers + mask record
    torch.save(compressed_payload(model, arch="samplenet", input_shape=(3, 32, 32),
                                  transforms=[{"kind": "mask", "layers": names}], meta={"num_classes": 10}), path)
    seen = {}
    measure = stab.linear_path_errors

    def spy(model_a, model_b, **kwargs):
        seen["copies"] = (model_a, model_b)
        return measure(model_a, model_b, **kwargs)

    monkeypatch.setattr(stab, "linear_path_errors", spy)
    result = stability(path, data=_tiny_data(tmp_path), steps=4, batch_size=16, points=3, bn_images=16, lr=0.1,
                       eval_images=16, seeds=(1, 2), device="cpu", train_progress=False)
    assert len(result.errors) == 3 and result.barrier == pytest.approx(error_barrier(result.errors))
    assert result.settings["masked_layers"] == len(names)
    for copy_ in seen["copies"]:
        layers = [m for m in copy_.modules() if hasattr(m, MASK)]
        assert len(layers) == len(names)
        pruned = sum(int((~getattr(m, MASK)).sum()) for m in layers)
        assert pruned == int(0.7 * total)  # the masks themselves are unchanged by training
        assert all(bool((m.weight[~getattr(m, MASK)] == 0).all()) for m in layers)  # exactly zero, not small
        assert any(bool((m.weight[getattr(m, MASK)] != model.get_submodule(n).weight[getattr(m, MASK)]).any())
                   for n, m in zip(names, layers))  # and the kept weights did train
    assert all(r["sparsity"] >= 0.7 - 1e-3 for r in result.training)
    assert "Weight masks of" in stab.render_markdown(result)


@pytest.mark.parametrize("kwargs, match", [
    ({"data": None}, "pass --data"), ({"epochs": 1, "steps": 1}, "one of them"), ({"steps": None}, "--epochs N"),
    ({"steps": 0}, "--steps must be"), ({"seeds": (1,)}, "two integer"), ({"points": 1}, "--points"),
    ({"lr": -1.0}, "learning rate"),
])
def test_bad_settings_are_one_line_errors(tmp_path, kwargs, match) -> None:
    settings = {"data": _tiny_data(tmp_path), "steps": 1, "device": "cpu", "train_progress": False, **kwargs}
    with pytest.raises(InputError, match=match) as info:
        stability(_samplenet_file(tmp_path), **settings)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_writes_json_markdown_and_plot(tmp_path) -> None:
    out = tmp_path / "stab"
    run = CliRunner().invoke(tools, ["stability", _samplenet_file(tmp_path), "--data", _tiny_data(tmp_path),
                                     "--eval-data", _tiny_data(tmp_path, 32), "--steps", "2", "--batch-size", "16",
                                     "--points", "3", "--bn-images", "16", "--device", "cpu", "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    report = json.loads((out / "stability.json").read_text())
    assert report["alphas"] == [0.0, 0.5, 1.0] and report["evaluated_on"] == "--eval-data (32 images)"
    assert report["barrier"] == pytest.approx(max(report["errors"]) - (report["errors"][0] + report["errors"][-1]) / 2)
    assert "error barrier" in (out / "stability.md").read_text()
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(tools, ["stability", _samplenet_file(tmp_path), "--data", _tiny_data(tmp_path),
                                       "--steps", "1", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize("args, message", [
    ([], "pass --data"),  # a model without data
    (["--data", "{data}", "--epochs", "1", "--steps", "1"], "one of them"),
    (["--data", "missing.npz", "--steps", "1"], "no such file"),
    (["--data", "{data}", "--steps", "1", "--normalize", "imagenett"], "normalisation"),
    (["--data", "{data}", "--steps", "1", "--points", "1"], "--points"),
])
def test_cli_bad_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message) -> None:
    out = tmp_path / "stab"
    data = _tiny_data(tmp_path)
    argv = ["stability", _samplenet_file(tmp_path), *[a.format(data=data) for a in args], "--device", "cpu",
            "--out", str(out)]
    run = CliRunner().invoke(tools, argv)
    assert run.exit_code == 2, run.output
    lines = run.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], run.output
    assert not out.exists()


def test_cli_missing_model_exits_2(tmp_path) -> None:
    run = CliRunner().invoke(tools, ["stability", str(tmp_path / "none.pt"), "--data", _tiny_data(tmp_path),
                                     "--steps", "1", "--out", str(tmp_path / "o")])
    assert run.exit_code == 2 and "not found" in run.output and not (tmp_path / "o").exists()


def test_without_matplotlib_the_plot_is_a_one_line_hint_before_any_work(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the bench extra looks like
    out = tmp_path / "stab"
    run = CliRunner().invoke(tools, ["stability", _samplenet_file(tmp_path), "--data", _tiny_data(tmp_path),
                                     "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert run.exit_code == 2 and 'pip install "compressor[bench]"' in run.output and "--no-plot" in run.output
    assert len(run.output.strip().splitlines()) == 1 and not out.exists()
    ok = CliRunner().invoke(tools, ["stability", _samplenet_file(tmp_path), "--data", _tiny_data(tmp_path),
                                    "--steps", "1", "--points", "2", "--bn-images", "16", "--eval-images", "16",
                                    "--batch-size", "16", "--device", "cpu", "--no-plot", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in out.iterdir()) == ["stability.json", "stability.md"]
