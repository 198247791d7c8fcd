"""Tests for compressor.data: every format, the restricted unpickler, normalisation, loaders, subsets and checks."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.data import (
    ImageDataset,
    Normalization,
    augment_batch,
    calibration_subset,
    check_dataset,
    load_dataset,
    make_loader,
    parse_normalize,
)
from compressor.errors import DataError, InputError


def _images(n: int = 12, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), np.arange(n, dtype=np.int64) % 3


def _dataset(labels: list[int], *, shape: tuple[int, int, int] = (3, 4, 4)) -> ImageDataset:
    x = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(len(labels), *shape).clone()
    return ImageDataset(x, torch.tensor(labels, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------------------ npz


def test_npz_uint8_nhwc(tmp_path: Path) -> None:
    x, y = _images()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
    assert ds.image_shape == (3, 8, 8) and len(ds) == 12 and ds.num_classes_seen == 3
    assert torch.equal(ds.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    img, label = ds[5]
    assert img.shape == (3, 8, 8) and label == 2 and isinstance(label, int)


@pytest.mark.parametrize("layout", ["float_nchw", "float_nhwc", "uint8_nchw"])
def test_npz_other_layouts(tmp_path: Path, layout: str) -> None:
    x, y = _images(c=1)
    nchw = x.transpose(0, 3, 1, 2)
    arrays = {"float_nchw": nchw.astype(np.float64) / 255, "float_nhwc": x.astype(np.float32) / 255,
              "uint8_nchw": nchw}
    np.savez(tmp_path / "d.npz", x=arrays[layout], y=y)
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.image_shape == (1, 8, 8)
    expected = torch.from_numpy(nchw)
    if layout.startswith("float"):
        assert ds.x.dtype == torch.float32
        expected = expected.float() / 255
    assert torch.allclose(ds.x.float(), expected.float())


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(2, np.int64)}, "missing array(s) x"),
    ({"x": np.zeros((3, 4, 4, 3), np.uint8), "y": np.zeros(2, np.int64)}, "3 images but y holds 2"),
    ({"x": np.zeros((2, 5, 5, 5), np.uint8), "y": np.zeros(2, np.int64)}, "cannot find the channel axis"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros((2, 10))}, "one-hot"),
    ({"x": np.full((2, 4, 4, 3), 300, np.int32), "y": np.zeros(2, np.int64)}, "0..255"),
])
def test_npz_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="bad.npz") as info:
        load_dataset(str(path))
    assert message in str(info.value)


def test_npz_object_array_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="obj.npz"):
        load_dataset(str(path))


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory.*npz"):
        load_dataset(str(tmp_path / "nope.npz"))
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        load_dataset(str(tmp_path / "notes.csv"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read .*broken.npz"):
        load_dataset(str(tmp_path / "broken.npz"))


# ---------------------------------------------------------------------------------------------------- ImageFolder


def _write_png(path: Path, array: np.ndarray, mode: str) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_rgb(tmp_path: Path) -> None:
    x, _ = _images(n=4)
    for i, cls in enumerate(["dog", "cat", "cat", "dog"]):
        _write_png(tmp_path / cls / f"{i}.png", x[i], "RGB")
    (tmp_path / "cat" / "README.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path))
    assert ds.class_names == ("cat", "dog")  # sorted names -> labels 0, 1
    assert ds.y.tolist() == [0, 0, 1, 1] and ds.image_shape == (3, 8, 8)
    assert torch.equal(ds.x[0], torch.from_numpy(x[1]).permute(2, 0, 1))  # cat/1.png, lossless PNG


def test_image_folder_grayscale_and_size_mismatch(tmp_path: Path) -> None:
    x, _ = _images(n=3, c=1)
    for i in range(3):
        _write_png(tmp_path / "gray" / f"c{i}" / "a.png", x[i, :, :, 0], "L")
    assert load_dataset(str(tmp_path / "gray")).image_shape == (1, 8, 8)
    _write_png(tmp_path / "mixed" / "a" / "1.png", x[0, :, :, 0], "L")
    _write_png(tmp_path / "mixed" / "b" / "2.png", np.zeros((5, 8), np.uint8), "L")
    with pytest.raises(DataError, match=r"2\.png: image is 8x5 but .*1\.png is 8x8"):
        load_dataset(str(tmp_path / "mixed"))


def test_image_folder_errors(tmp_path: Path) -> None:
    _write_png(tmp_path / "flat" / "a.png", np.zeros((4, 4), np.uint8), "L")
    with pytest.raises(DataError, match="one sub-directory per class"):
        load_dataset(str(tmp_path / "flat"))
    (tmp_path / "corrupt" / "a").mkdir(parents=True)
    (tmp_path / "corrupt" / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image .*x.png"):
        load_dataset(str(tmp_path / "corrupt"))
    _write_png(tmp_path / "big" / "a" / "1.png", np.zeros((8, 8), np.uint8), "L")
    with pytest.raises(DataError, match="limit"):
        load_dataset(str(tmp_path / "big"), max_bytes=10)


# ------------------------------------------------------------------------------------------------------- CIFAR-10


def _write_batch(path: Path, n: int, seed: int, protocol: int = pickle.DEFAULT_PROTOCOL) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    with path.open("wb") as fh:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": [i % 10 for i in range(n)]}, fh,
                    protocol=protocol)
    return data


def test_cifar_directory_and_single_batch(tmp_path: Path) -> None:
    first = _write_batch(tmp_path / "data_batch_1", 4, seed=1)
    _write_batch(tmp_path / "data_batch_2", 3, seed=2, protocol=2)  # protocol 2, as the distributed files
    _write_batch(tmp_path / "test_batch", 5, seed=3)
    ds = load_dataset(str(tmp_path))
    assert len(ds) == 7 and ds.image_shape == (3, 32, 32)
    assert torch.equal(ds.x[0, 1], torch.from_numpy(first[0, 1024:2048].reshape(32, 32)))  # G plane of image 0
    assert ds.y.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert len(load_dataset(str(tmp_path / "test_batch"))) == 5


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return os.system, (f"touch {self.marker}",)


class _RunsPython:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsPython])
@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, payload: type, nested: bool) -> None:
    marker = tmp_path / "marker"
    evil = payload(marker)
    obj = {b"data": evil, b"labels": [0]} if nested else evil
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(obj))
    for spec in (tmp_path, tmp_path / "data_batch_1"):
        with pytest.raises(DataError, match="refusing to unpickle (posix|nt|builtins)"):
            load_dataset(str(spec))
    assert not marker.exists()


def test_cifar_batch_with_wrong_content(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        load_dataset(str(tmp_path / "test_batch"))


# ------------------------------------------------------------------------------------------------------ factories


FACTORY = """
import numpy as np
import torch

class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((3, 4, 4), i, dtype=torch.uint8), i % 2

def make():
    return Squares()

def arrays():
    return np.zeros((5, 4, 4, 3), np.uint8), np.arange(5) % 2

def bad():
    return 42

NOT_A_FUNCTION = 1
"""


def test_factory_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_data.py").write_text(textwrap.dedent(FACTORY))
    ds = load_dataset(f"{tmp_path / 'my_data.py'}:make")
    assert len(ds) == 6 and ds.image_shape == (3, 4, 4) and ds.x.dtype == torch.uint8
    assert int(ds.x[4, 0, 0, 0]) == 4 and ds.y.tolist() == [0, 1, 0, 1, 0, 1]
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    ds = load_dataset("my_data:arrays")
    assert len(ds) == 5 and ds.image_shape == (3, 4, 4)


def test_factory_errors(tmp_path: Path) -> None:
    (tmp_path / "f.py").write_text(textwrap.dedent(FACTORY))
    file = tmp_path / "f.py"
    with pytest.raises(DataError, match="returned int"):
        load_dataset(f"{file}:bad")
    with pytest.raises(DataError, match="no function 'NOT_A_FUNCTION'"):
        load_dataset(f"{file}:NOT_A_FUNCTION")
    with pytest.raises(DataError, match="no function 'missing'"):
        load_dataset(f"{file}:missing")
    with pytest.raises(DataError, match="name the function"):
        load_dataset(str(file))
    with pytest.raises(DataError, match="no module named 'no_such_module_xyz'"):
        load_dataset("no_such_module_xyz:make")
    with pytest.raises(DataError, match="GiB in memory"):
        load_dataset(f"{file}:make", max_bytes=100)


# -------------------------------------------------------------------------------------------------- normalisation


def test_parse_normalize_names_and_custom() -> None:
    assert parse_normalize("imagenet") == Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet")
    assert parse_normalize(" CIFAR ").mean == (0.4914, 0.4822, 0.4465)
    assert parse_normalize("none") is None and parse_normalize(None) is None
    custom = parse_normalize("0.5/0.25")
    assert custom.mean == (0.5,) and custom.std == (0.25,)
    assert len(parse_normalize("0.1,0.2,0.3,0.4/1,1,1,1").mean) == 4
    out = custom(torch.full((1, 1, 2, 2), 1.0))
    assert torch.allclose(out, torch.full_like(out, 2.0))


@pytest.mark.parametrize("spec, message", [
    ("imagnet", "Did you mean 'imagenet'"),
    ("bogus", "imagenet, cifar, none"),
    ("0.5,0.5/0.2", "2 means but 1 stds"),
    ("0.5/0", "std > 0"),
    ("0.5/-1", "std > 0"),
    ("a,b/c,d", "cannot parse"),
    ("0.5/0.5/0.5", "cannot parse"),
])
def test_parse_normalize_errors(spec: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_normalize(spec)
    assert message in str(info.value)


# -------------------------------------------------------------------------------------------------------- loaders


def test_loader_scales_normalises_and_batches() -> None:
    ds = ImageDataset(torch.full((10, 3, 4, 4), 255, dtype=torch.uint8), torch.arange(10) % 2)
    loader = make_loader(ds, batch_size=4, normalize="imagenet")
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[0, :, 0, 0], (1 - mean) / std)
    assert len(make_loader(ds, batch_size=4, normalize=None, drop_last=True)) == 2
    with pytest.raises(InputError, match="batch size"):
        make_loader(ds, batch_size=0, normalize=None)
    with pytest.raises(DataError, match="3 channels but .* 1-channel"):
        make_loader(_dataset([0, 1], shape=(1, 4, 4)), batch_size=2, normalize="cifar")


def test_loader_shuffle_is_repeatable_per_seed_and_changes_per_epoch() -> None:
    ds = ImageDataset(torch.zeros((20, 1, 2, 2), dtype=torch.uint8), torch.arange(20))

    def order(loader) -> list[int]:
        return torch.cat([y for _, y in loader]).tolist()

    a, b = make_loader(ds, batch_size=6, normalize=None, shuffle=True, seed=3), \
        make_loader(ds, batch_size=6, normalize=None, shuffle=True, seed=3)
    first = order(a)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert first == order(b) and order(a) == order(b)  # same seed: same sequence of epochs
    later = [tuple(order(a)) for _ in range(3)]
    assert len({tuple(first), *later}) > 1  # a new order each epoch


def test_augmentation_shape_determinism_and_content() -> None:
    x = torch.rand((16, 3, 8, 8))
    a = augment_batch(x, generator=torch.Generator().manual_seed(0))
    b = augment_batch(x, generator=torch.Generator().manual_seed(0))
    c = augment_batch(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # each output image is a shifted (and maybe flipped) window of its own zero-padded input
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)
    ds = ImageDataset(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    runs = [[x for x, _ in make_loader(ds, batch_size=4, normalize="cifar", augment=True, seed=5)] for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(*runs)) and runs[0][0].shape == (4, 3, 8, 8)


# ---------------------------------------------------------------------------------------- subsets and dataset checks


def test_calibration_subset_is_balanced_and_deterministic() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 4
    ds = _dataset(labels)
    sub = calibration_subset(ds, 30, seed=0)
    counts = torch.bincount(sub.y, minlength=3).tolist()
    assert len(sub) == 30 and counts[2] == 4 and abs(counts[0] - counts[1]) <= 1  # class 2 gives its share away
    again = calibration_subset(ds, 30, seed=0)
    assert torch.equal(sub.x, again.x)
    assert not torch.equal(calibration_subset(ds, 30, seed=1).x, sub.x)
    assert torch.bincount(calibration_subset(ds, 9, seed=0).y).tolist() == [3, 3, 3]
    assert calibration_subset(ds, 1000, seed=0) is ds
    with pytest.raises(InputError):
        calibration_subset(ds, 0, seed=0)


def test_subset_and_repr() -> None:
    ds = _dataset([0, 1, 2, 1])
    sub = ds.subset([3, 0])
    assert sub.y.tolist() == [1, 0] and int(sub.x[0, 0, 0, 0]) == 3 and sub.num_classes_seen == 2
    assert "n=4" in repr(ds)
    with pytest.raises(InputError, match="subset indices"):
        ds.subset([4])


def test_check_dataset_accepts_matching_data() -> None:
    ds = _dataset([0, 1, 9])
    check_dataset(ds, input_shape=(3, 4, 4), num_classes=10, name="--data")
    check_dataset(ds, input_shape=(1, 3, 4, 4), num_classes=None, name="--data")
    check_dataset(ds, input_shape=(3, None, None), num_classes=10, name="--data")
    check_dataset(ds, input_shape=None, num_classes=10, name="--data")


@pytest.mark.parametrize("labels, shape, input_shape, message", [
    ([], (3, 4, 4), (3, 4, 4), "--data .* holds no images"),
    ([0], (1, 4, 4), (3, 4, 4), "1-channel images .* expects 3 channels .* convert the images to RGB"),
    ([0], (3, 4, 4), (1, 4, 4), "3-channel images .* grayscale"),
    ([0], (4, 4, 4), (3, 4, 4), "drop the alpha channel"),
    ([0], (3, 8, 8), (3, 4, 4), "images are 3x8x8 but the model expects 3x4x4; resize"),
    ([0, 10], (3, 4, 4), (3, 4, 4), r"labels span 0\.\.10 but the classifier has 10 outputs \(labels 0\.\.9\)"),
    ([1, 10], (3, 4, 4), (3, 4, 4), "1-based"),
    ([-1, 3], (3, 4, 4), (3, 4, 4), r"labels span -1\.\.3"),
])
def test_check_dataset_errors(labels: list[int], shape: tuple, input_shape: tuple, message: str) -> None:
    ds = _dataset(labels, shape=shape)
    with pytest.raises(DataError, match=message) as info:
        check_dataset(ds, input_shape=input_shape, num_classes=10, name="--data")
    assert "\n" not in str(info.value)
