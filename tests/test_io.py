"""Model loading (safe by default), checkpoint wrappers, errors, and the compressed-model round trip."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from compressor.errors import InputError, ModelLoadError, UnknownNameError
from compressor.io import compressed_payload, load_compressed, load_model
from compressor.models import create_model
from compressor.pruning import engine

from .conftest import akamaster

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def resnet20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("resnet20").state_dict()


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "best_prec1": 90.0},
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
], ids=["plain", "state_dict", "model", "dataparallel", "compiled"])
def test_common_wrappers_load(tmp_path: Path, resnet20_state: dict, wrap) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(resnet20_state), path)
    loaded = load_model(path, arch="resnet20")
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, resnet20_state[key])
    assert loaded.input_shape == (3, 32, 32)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_akamaster_checkpoints_load_strictly(depth: int) -> None:
    loaded = load_model(akamaster(depth), arch=f"resnet{depth}")
    assert loaded.meta.get("best_prec1", 0) > 90
    assert loaded.model(X).shape == (2, 10)


def test_key_mismatch_names_first_missing_and_unexpected(tmp_path: Path, resnet20_state: dict) -> None:
    state = dict(resnet20_state)
    state["extra.weight"] = state.pop("linear.weight")
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"missing \(first: linear\.weight\).*unexpected \(first: extra\.weight\)"):
        load_model(path, arch="resnet20")
    state = dict(resnet20_state)
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"layer1\.0\.conv1\.weight has shape \(3, 3, 3, 3\)"):
        load_model(path, arch="resnet20")


def test_num_classes_is_read_from_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c100.pt"
    torch.save(create_model("resnet20", num_classes=100).state_dict(), path)
    assert load_model(path, arch="resnet20").model(X).shape == (2, 100)


def test_arch_recorded_in_checkpoint_is_used(tmp_path: Path) -> None:
    path = tmp_path / "sample.pt"
    torch.save({"state_dict": create_model("samplenet").state_dict(), "arch": "samplenet"}, path)
    assert load_model(path).arch == "samplenet"


def test_weights_without_arch_ask_for_arch(tmp_path: Path, resnet20_state: dict) -> None:
    path = tmp_path / "w.pt"
    torch.save(resnet20_state, path)
    with pytest.raises(InputError, match="pass --arch"):
        load_model(path)
    with pytest.raises(UnknownNameError, match="resnet20"):
        load_model(path, arch="resnet21")


@pytest.mark.parametrize("content",
                         [b"", b"not a checkpoint at all", b"this is not a checkpoint", b"PK\x03\x04broken zip"])
def test_garbage_is_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        load_model(path, arch="resnet20")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.pt", arch="resnet20")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['COMPRESSOR_MARKER']}",))


def test_pickle_that_runs_code_is_refused_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("COMPRESSOR_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(ModelLoadError, match="unpickling can run arbitrary code.*--trust-pickle"):
        load_model(path, arch="resnet20")
    assert not marker.exists(), "the pickle's code ran"


def test_whole_module_needs_trust_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("samplenet").eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    torch.testing.assert_close(loaded.model(X), model(X))


def test_user_factory_file(tmp_path: Path) -> None:
    factory = tmp_path / "mynet.py"
    factory.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, 2))\n"
    )
    weights = tmp_path / "w.pt"
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynet_ref", factory)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build().state_dict(), weights)
    loaded = load_model(weights, arch=f"{factory}:build")
    assert loaded.model(X).shape == (2, 2)
    with pytest.raises(InputError, match="no callable 'missing'"):
        load_model(weights, arch=f"{factory}:missing")
    with pytest.raises(InputError, match="file not found"):
        load_model(weights, arch=f"{tmp_path / 'absent.py'}:build")


def test_compressed_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    pruned = copy.deepcopy(model)
    graph = engine.build_graph(pruned, X[:1])
    groups = engine.discover_groups(pruned, graph)
    scores = {g.root: torch.rand(g.channels) for g in groups}
    engine.apply_keep(pruned, graph, groups, scores, engine.uniform_keep(groups, 0.4, min_keep=0.1, round_to=1))
    payload = compressed_payload(pruned, arch="resnet20", input_shape=(3, 32, 32),
                                 transforms=[{"kind": "prune", "history": graph.pruning_history()}],
                                 meta={"num_classes": 10})
    path = tmp_path / "compressed.pt"
    torch.save(payload, path)
    torch.load(path, weights_only=True)  # must not need pickled objects
    rebuilt = load_compressed(path)
    torch.testing.assert_close(rebuilt(X), pruned(X))
    assert load_model(path).model.conv1.out_channels == pruned.conv1.out_channels
    other = tmp_path / "plain.pt"
    torch.save(model.state_dict(), other)
    with pytest.raises(ModelLoadError, match="not written by compressor"):
        load_compressed(other)
