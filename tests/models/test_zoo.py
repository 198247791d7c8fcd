"""Tests for the built-in model zoo: the registry, every registered architecture, the released CIFAR ResNet
checkpoints in ``../shared`` (skipped when absent) and the bundled sample in ``samples/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import compressor.models.registry as registry
from compressor.errors import InputError, UnknownNameError
from compressor.models import ArchSpec, create_model, get_arch, list_archs, register_arch, reinitialise
from compressor.models.layers import ChannelShortcut

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
RESNET_DIR = SHARED / "models" / "cifar10-resnet"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test1000.npz"
SAMPLES = REPO / "samples"

# arch -> (checkpoint file, parameter count, top-1 on test1000.npz); from ../shared/README.md.
AKAMASTER = {
    "resnet20": ("resnet20-12fca82f.th", 269_722, 91.5),
    "resnet32": ("resnet32-d509ac18.th", 464_154, 92.8),
    "resnet44": ("resnet44-014dd654.th", 658_586, 93.3),
    "resnet56": ("resnet56-4bfd9763.th", 853_018, 92.6),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _to_input(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return (t - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 250) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def _fill_num_batches_tracked(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Add the BatchNorm ``num_batches_tracked`` buffers that pre-1.0 checkpoints lack, with torch's default 0.

    Only keys ending in ``.num_batches_tracked`` are filled, so every other missing key still fails strict loading.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k.endswith(".num_batches_tracked") and k not in state_dict]
    return {**state_dict, **{k: torch.zeros_like(expected[k]) for k in missing}}


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_lists_the_zoo() -> None:
    names = list_archs()
    assert names == sorted(names)
    expected = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11_bn", "vgg16_bn", "mobilenetv2"}
    assert expected | {"samplenet"} <= set(names)


@pytest.mark.parametrize("name", list_archs())
def test_forward_backward(name: str) -> None:
    spec = get_arch(name)
    assert isinstance(spec, ArchSpec) and spec.name == name and spec.description
    torch.manual_seed(0)
    model = create_model(name)
    out = model(torch.randn(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_archs())
def test_num_classes_override(name: str) -> None:
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *get_arch(name).input_shape)).shape == (2, 3)


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown architecture 'resnet2'\. Did you mean .*'resnet20'") as err:
        get_arch("resnet2")
    assert isinstance(err.value, ValueError) and "samplenet" in str(err.value)
    with pytest.raises(UnknownNameError, match="'vgg16_bn'"):
        create_model("vgg16bn")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_num_classes(bad: object) -> None:
    with pytest.raises(InputError, match="num_classes"):
        create_model("samplenet", num_classes=bad)  # type: ignore[arg-type]


def test_duplicate_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_ARCHS", dict(registry._ARCHS))  # keep the real registry clean
    original = get_arch("resnet20").factory
    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_arch("resnet20")(lambda *, num_classes: nn.Linear(1, num_classes))
    assert get_arch("resnet20").factory is original

    register_arch("tiny_test_arch", input_shape=(1, 4, 4), num_classes=2)(lambda *, num_classes: nn.Flatten())
    assert "tiny_test_arch" in list_archs() and get_arch("tiny_test_arch").input_shape == (1, 4, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_arch("tiny_test_arch")(lambda *, num_classes: nn.Flatten())
    with pytest.raises(ValueError, match="non-empty"):
        register_arch("")


# --- structure ----------------------------------------------------------------------------------------------------


def test_resnet_option_a_shortcut() -> None:
    model = create_model("resnet20")
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    for stage in (model.layer2, model.layer3):
        assert isinstance(stage[0].shortcut, ChannelShortcut)
        assert all(isinstance(block.shortcut, nn.Identity) for block in stage[1:])
    x = torch.randn(2, 16, 32, 32)
    expected = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    torch.testing.assert_close(model.layer2[0].shortcut(x), expected)


def test_samplenet_has_the_promised_structures() -> None:
    model = create_model("samplenet")
    assert 20_000 <= sum(p.numel() for p in model.parameters()) <= 60_000
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert depthwise and all(m.out_channels == m.in_channels for m in depthwise)
    assert model.branch_a[0].out_channels + model.branch_b[0].out_channels == model.dw[0].in_channels


# --- released checkpoints (../shared) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_test() -> tuple[torch.Tensor, torch.Tensor]:
    if not CIFAR_TEST.is_file():
        pytest.skip(f"CIFAR-10 test images not found: {CIFAR_TEST}")
    data = np.load(CIFAR_TEST)
    return _to_input(data["x"], IMAGENET_MEAN, IMAGENET_STD), torch.from_numpy(data["y"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AKAMASTER))
def test_akamaster_checkpoint_loads_strictly_and_matches(name: str, cifar_test: tuple[torch.Tensor, ...]) -> None:
    filename, n_params, expected_top1 = AKAMASTER[name]
    path = RESNET_DIR / filename
    if not path.is_file():
        pytest.skip(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    model = create_model(name)
    model.load_state_dict(_fill_num_batches_tracked(state_dict, model), strict=True)
    assert sum(p.numel() for p in model.parameters()) == n_params
    top1 = _top1(model, *cifar_test)
    assert abs(top1 - expected_top1) <= 0.15, f"{name}: top-1 {top1:.1f} on test1000.npz, expected {expected_top1}"


# --- bundled sample (samples/) --------------------------------------------------------------------------------------


def test_sample_data_format() -> None:
    total = 0
    for split in ("train", "test"):
        path = SAMPLES / f"shapes_{split}_set.npz"
        data = np.load(path)
        x, y = data["x"], data["y"]
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert set(np.unique(y).tolist()) == set(range(10))
        total += path.stat().st_size
    assert total < 2_000_000


@pytest.mark.parametrize("arch", ["samplenet", "samplenet_wide"])
def test_sample_model_loads_and_is_accurate(arch: str) -> None:
    checkpoint = torch.load(SAMPLES / f"{arch}.pt", map_location="cpu", weights_only=True)
    assert checkpoint["arch"] == arch and checkpoint["normalize"] == "0.5,0.5,0.5/0.5,0.5,0.5"
    model = create_model(checkpoint["arch"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    mean_text, std_text = checkpoint["normalize"].split("/")
    mean, std = (tuple(float(v) for v in text.split(",")) for text in (mean_text, std_text))
    data = np.load(SAMPLES / "shapes_test_set.npz")
    top1 = _top1(model, _to_input(data["x"], mean, std), torch.from_numpy(data["y"]))
    assert top1 >= 80.0
    assert abs(top1 - checkpoint["accuracy"]) <= 1.0, f"top-1 {top1:.1f} vs recorded {checkpoint['accuracy']:.1f}"


def test_reinitialise_draws_fresh_seeded_weights_and_leaves_the_input_alone() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    with torch.no_grad():
        model.bn1.running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    a, b, c = reinitialise(model, seed=1), reinitialise(model, seed=1), reinitialise(model, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG stream was disturbed"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the input was modified"
    assert not torch.equal(a.conv1.weight, model.conv1.weight)
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert torch.equal(a.bn1.running_mean, torch.zeros(16)), "BN statistics were not reset"
