"""Data set loaders (shipped, IDX directories, CIFAR-10 binary, image folders, module
plug-ins), ArrayDataset and subset, and a centralized training check."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmpq.data import ArrayDataset, DatasetSplit, load_dataset, subset, write_idx
from fedmpq.data.datasets import SHIPPED_DIR
from fedmpq.errors import ConfigError
from fedmpq.models import build_model

# --------------------------------------------------------------------------- shipped data


@pytest.fixture(scope="module")
def shipped() -> DatasetSplit:
    return load_dataset("fashion-mnist-small")


def test_shipped_data(shipped: DatasetSplit) -> None:
    assert shipped.name == "fashion-mnist-small"
    assert shipped.num_classes == 10 and shipped.in_shape == (1, 28, 28)
    assert shipped.train.x.shape == (12_000, 1, 28, 28) and shipped.train.x.dtype == np.uint8
    assert shipped.test.x.shape == (2_000, 1, 28, 28)
    assert shipped.train.y.dtype == np.int64
    assert np.bincount(shipped.train.y).tolist() == [1_200] * 10
    assert np.bincount(shipped.test.y).tolist() == [200] * 10
    # Fashion-MNIST's well-known statistics (mean 0.286, std 0.353).
    assert shipped.train.mean[0] == pytest.approx(0.286, abs=0.005)
    assert shipped.train.std[0] == pytest.approx(0.353, abs=0.005)
    assert shipped.test.mean == shipped.train.mean
    assert len(repr(shipped)) < 400  # shapes, not pixel dumps


def test_shipped_files_are_small_and_licensed() -> None:
    total = sum(p.stat().st_size for p in SHIPPED_DIR.glob("*.gz"))
    assert total < 6.5e6
    license_text = (SHIPPED_DIR / "LICENSE-fashion-mnist.txt").read_text(encoding="utf-8")
    assert "Zalando SE" in license_text and "MIT" in license_text


def test_array_dataset_items_and_tensors(shipped: DatasetSplit) -> None:
    ds = shipped.test
    x, y = ds.tensors()
    assert x.dtype == torch.float32 and x.shape == (2_000, 1, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == ds.y.tolist()
    item, label = ds[5]
    assert isinstance(label, int) and label == ds.y[5]
    assert torch.allclose(item, x[5])
    expected = (ds.x[5].astype(np.float32) / 255 - ds.mean[0]) / ds.std[0]
    np.testing.assert_allclose(item.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(shipped.train.tensors()[0].mean())) < 0.01


def test_array_dataset_float_input_is_not_modified() -> None:
    x = np.full((2, 1, 2, 2), 0.5, np.float32)
    ds = ArrayDataset(x, np.array([0, 1], np.uint8), mean=(0.25,), std=(0.5,))
    assert ds.y.dtype == np.int64
    np.testing.assert_allclose(ds.tensors()[0].numpy(), 0.5)
    np.testing.assert_array_equal(x, 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"x": np.zeros((2, 4, 4), np.uint8)},
        {"x": np.zeros((2, 1, 4, 4), np.int32)},
        {"y": np.zeros(3, np.int64)},
        {"y": np.zeros(2, np.float32)},
        {"std": (0.0,)},
        {"mean": (0.1, 0.2)},
    ],
)
def test_array_dataset_validation(kwargs: dict) -> None:
    args = {"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.zeros(2, np.int64), **kwargs}
    with pytest.raises(ConfigError):
        ArrayDataset(**args)


def test_subset(shipped: DatasetSplit) -> None:
    part = subset(shipped.test, np.array([3, 1, 4]))
    assert len(part) == 3 and part.mean == shipped.test.mean
    np.testing.assert_array_equal(part.y, shipped.test.y[[3, 1, 4]])
    assert len(subset(shipped.test, [])) == 0
    with pytest.raises(ConfigError):
        subset(shipped.test, [2_000])
    with pytest.raises(ConfigError):
        subset(shipped.test, [0.5])


# --------------------------------------------------------------------------- other loaders


def test_idx_dir_raw_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 6)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 5, 7), "u1"))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype="u1") % 3)
    split = load_dataset(f"idx:{tmp_path}")
    assert split.in_shape == (1, 5, 7) and split.num_classes == 3
    assert len(split.train) == 20 and len(split.test) == 6


def test_idx_dir_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte"):
        load_dataset(f"idx:{tmp_path}")


def write_cifar(path: Path, labels: list[int], rng: np.random.Generator) -> np.ndarray:
    pixels = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate(
        [np.asarray(labels, np.uint8)[:, None], pixels.reshape(len(labels), -1)], axis=1
    )
    path.write_bytes(records.tobytes())
    return pixels


def test_cifar10_bin(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batches = tmp_path / "cifar-10-batches-bin"
    batches.mkdir()
    first = write_cifar(batches / "data_batch_1.bin", [3, 9], rng)
    for i in range(2, 6):
        write_cifar(batches / f"data_batch_{i}.bin", [i], rng)
    test_pixels = write_cifar(batches / "test_batch.bin", [0, 1, 2], rng)
    split = load_dataset(f"cifar10-bin:{tmp_path}")
    assert split.in_shape == (3, 32, 32) and split.num_classes == 10
    assert split.train.y.tolist() == [3, 9, 2, 3, 4, 5]
    np.testing.assert_array_equal(split.train.x[:2], first)
    np.testing.assert_array_equal(split.test.x, test_pixels)
    assert len(split.train.mean) == 3

    (batches / "test_batch.bin").write_bytes(bytes(3073 + 5))
    with pytest.raises(ConfigError, match="3073-byte records"):
        load_dataset(f"cifar10-bin:{batches}")


def write_png_folder(root: Path, mode: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    channels = 3 if mode == "RGB" else 1
    for split, count in (("train", 3), ("test", 1)):
        for cls in ("cat", "ant", "bee"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (6, 5, channels), dtype=np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
                    d / f"{i}.png"
                )
    (root / "train" / "ant" / "notes.txt").write_text("ignored")


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_image_folder(tmp_path: Path, mode: str, channels: int) -> None:
    write_png_folder(tmp_path, mode)
    split = load_dataset(f"folder:{tmp_path}")
    assert split.in_shape == (channels, 6, 5) and split.num_classes == 3
    assert split.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ant, bee, cat
    assert len(split.test) == 3
    from PIL import Image

    with Image.open(tmp_path / "train" / "bee" / "0.png") as img:
        first_bee = np.asarray(img).reshape(6, 5, channels)
    np.testing.assert_array_equal(split.train.x[3], first_bee.transpose(2, 0, 1))


def test_image_folder_errors(tmp_path: Path) -> None:
    write_png_folder(tmp_path, "RGB")
    from PIL import Image

    Image.new("RGB", (9, 9)).save(tmp_path / "test" / "cat" / "big.png")
    with pytest.raises(ConfigError, match="9x9"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "test" / "cat" / "big.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"big\.png"):
        load_dataset(f"folder:{tmp_path}")


def test_image_folder_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png_folder(tmp_path, "L")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match="Pillow"):
        load_dataset(f"folder:{tmp_path}")


def test_module_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_data_plugin.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from fedmpq.data import ArrayDataset, DatasetSplit

            def make():
                ds = ArrayDataset(np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 0, 1]))
                return DatasetSplit(ds, ds, 2, (1, 2, 2), "toy")

            def wrong():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    split = load_dataset("module:my_data_plugin:make")
    assert split.name == "toy" and len(split.train) == 4
    with pytest.raises(ConfigError, match="int"):
        load_dataset("module:my_data_plugin:wrong")
    with pytest.raises(ConfigError, match="no function"):
        load_dataset("module:my_data_plugin:absent")
    with pytest.raises(ConfigError, match="cannot import"):
        load_dataset("module:no_such_module_xyz:make")


@pytest.mark.parametrize(
    "spec", ["mnist", "idx:", "cifar10:/tmp", "folder:/definitely/not/here", "module:nofunc"]
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        load_dataset(spec)


def test_unknown_spec_lists_forms() -> None:
    with pytest.raises(ConfigError, match=r"idx:DIR.*cifar10-bin:DIR.*folder:DIR"):
        load_dataset("imagenet")


def test_split_validates_labels_and_shape() -> None:
    ds = ArrayDataset(np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 5]))
    with pytest.raises(ConfigError, match="labels"):
        DatasetSplit(ds, ds, 3, (1, 2, 2), "bad")
    with pytest.raises(ConfigError, match="shape"):
        DatasetSplit(ds, ds, 6, (1, 3, 3), "bad")


# --------------------------------------------------------------------------- training check


@pytest.fixture
def one_thread() -> Iterator[None]:
    # On a shared 2-core machine two intra-op threads can make small-batch training ~10x
    # slower than one (they spin waiting for each other), so pin this test to one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_cnn_learns_shipped_data_in_one_epoch(shipped: DatasetSplit) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", shipped.num_classes, shipped.in_shape)
    x, y = shipped.train.tensors()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for batch in torch.randperm(len(x)).split(64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    model.eval()
    x_test, y_test = shipped.test.tensors()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.70
