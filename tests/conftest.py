"""Shared fixtures: paths to ../shared (tests that need it skip with a message naming the file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLES = REPO / "samples"


def shared_file(relative: str) -> Path:
    """Path of a file under ../shared, or skip the test naming the missing file."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared checkout beside the repo); not found")
    return path


def akamaster(depth: int) -> Path:
    """Path of the trained CIFAR-10 ResNet-<depth> checkpoint in ../shared."""
    folder = SHARED / "models" / "cifar10-resnet"
    found = sorted(folder.glob(f"resnet{depth}-*.th")) if folder.exists() else []
    if not found:
        pytest.skip(f"needs {folder}/resnet{depth}-*.th (the ../shared checkout); not found")
    return found[0]


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Run every test on one torch thread. On a 2-core machine that is busy with anything else, two OpenMP threads
    mostly wait for each other: the mipp conformance test took 133 s with 2 threads and 19 s with 1 at load 3.5
    (tiny tensors: ~20 ms per op instead of microseconds). Speed goals are measured in ``benchmarks/``, not here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 random 32x32 RGB uint8 images (NHWC), labels 0-9 in turn: enough to calibrate, fine-tune a step and
    evaluate any method on a small model; the accuracy it gives means nothing."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tiny-data") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), y=np.arange(40) % 10)
    return path


@pytest.fixture
def api_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict]:
    """Replace ``compressor.api.compress`` (and the table) so a CLI invocation only records the keyword arguments
    it would have passed: one dict per call, ``model`` included."""
    calls: list[dict] = []

    class _Result:
        report: dict = {}
        files: dict = {}
        out_dir = tmp_path

    def fake(model, **kwargs):
        calls.append({"model": model, **kwargs})
        return _Result()

    monkeypatch.setattr("compressor.api.compress", fake)
    monkeypatch.setattr("compressor.report.print_table", lambda report: None)
    return calls
