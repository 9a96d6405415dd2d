"""In-memory image data sets and the loaders that build them from a spec string.

Spec forms accepted by :func:`load_dataset`:

``fashion-mnist-small``
    The class-balanced Fashion-MNIST subset shipped inside the package (default).
``idx:DIR``
    The four MNIST/Fashion-MNIST IDX files in ``DIR`` (raw or ``.gz``).
``cifar10-bin:DIR``
    The *binary* CIFAR-10 release (``data_batch_1.bin`` .. ``data_batch_5.bin``,
    ``test_batch.bin``).  The "python version" of CIFAR-10 is a set of pickles, and unpickling
    a file can run arbitrary code, so it is deliberately not supported.
``folder:DIR``
    Class-folder images ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (JPEG/PNG, decoded
    with Pillow, all of one size).
``module:pkg.mod:func``
    ``func()`` from an importable module returns a :class:`DatasetSplit`; the way to plug in
    one's own data.

Images are held as uint8 ``(N, C, H, W)``; normalisation happens when samples are read, with a
per-channel mean and standard deviation measured on the training split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fedmpq.data.idx import read_idx
from fedmpq.errors import ConfigError
from fedmpq.plugins import load_function

SHIPPED_DIR = Path(__file__).with_name("files")
"""Directory of the Fashion-MNIST subset shipped with the package."""

SPEC_FORMS = (
    "fashion-mnist-small",
    "idx:DIR",
    "cifar10-bin:DIR",
    "folder:DIR",
    "module:pkg.mod:func",
)

#: Label names of the standard data sets, in label order (exported into the ONNX model).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CIFAR_RECORD = 1 + 3 * 32 * 32


@dataclass(eq=False, repr=False)
class ArrayDataset(torch.utils.data.Dataset):
    """Images and labels held in numpy arrays.

    Attributes
    ----------
    x
        ``(N, C, H, W)`` images: uint8 (scaled by 1/255 when read) or float32 (used as is).
    y
        ``(N,)`` int64 labels; other integer dtypes are converted.
    mean, std
        Per-channel normalisation (one value, or one per channel), applied after scaling:
        ``(x - mean) / std``.
    """

    x: np.ndarray
    y: np.ndarray
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x)
        if self.x.ndim != 4 or self.x.dtype not in (np.uint8, np.float32):
            raise ConfigError(
                f"images must be a uint8 or float32 (N, C, H, W) array, got {self.x.dtype} "
                f"with shape {self.x.shape}"
            )
        y = np.asarray(self.y)
        if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(self.x):
            raise ConfigError(
                f"labels must be a 1-D integer array with one label per image ({len(self.x)}), "
                f"got {y.dtype} with shape {y.shape}"
            )
        self.y = y.astype(np.int64, copy=False)
        channels = self.x.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ConfigError(f"{label} needs 1 or {channels} values, got {len(values)}")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"std values must be positive, got {self.std}")

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(x={self.x.dtype}{list(self.x.shape)}, y=int64[{len(self.y)}], "
            f"mean={self.mean}, std={self.std})"
        )

    def _normalise(self, x: np.ndarray) -> torch.Tensor:
        # np.require copies read-only arrays, which torch.from_numpy would warn about.
        t = torch.from_numpy(np.require(x, requirements=["C", "W"]))
        scale = 255.0 if self.x.dtype == np.uint8 else 1.0
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        # One fused pass, and never in place: for float32 input t shares memory with self.x.
        return torch.addcmul(-mean / std, t.to(torch.float32), 1.0 / (scale * std))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._normalise(self.x[index]), int(self.y[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole data set as ``(float32 (N, C, H, W) normalised, int64 (N,))`` tensors.

        For training loops that slice mini-batches directly, without a ``DataLoader``.
        """
        return self._normalise(self.x), torch.from_numpy(self.y.copy())


@dataclass(eq=False)
class DatasetSplit:
    """A train/test pair with the facts models need.

    Attributes
    ----------
    train, test
        The two splits; their images have shape ``in_shape``.
    num_classes
        Labels are in ``[0, num_classes)``.
    in_shape
        ``(C, H, W)`` of one image.
    name
        Human-readable name (the spec it came from).
    class_names
        Label names in label order, when the data set has them.
    """

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    in_shape: tuple[int, int, int]
    name: str
    class_names: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for split, ds in (("train", self.train), ("test", self.test)):
            if tuple(ds.x.shape[1:]) != tuple(self.in_shape):
                raise ConfigError(
                    f"{self.name}: {split} images have shape {ds.x.shape[1:]}, "
                    f"expected {self.in_shape}"
                )
            if len(ds.y) and (ds.y.min() < 0 or ds.y.max() >= self.num_classes):
                raise ConfigError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes})"
                )


def subset(ds: ArrayDataset, indices: Sequence[int] | np.ndarray) -> ArrayDataset:
    """The samples of ``ds`` at ``indices`` (copied), with the same normalisation.

    Raises
    ------
    ConfigError
        If the indices are not 1-D integers within ``[0, len(ds))``.
    """
    idx = np.asarray(indices)
    if idx.size == 0:
        idx = idx.astype(np.int64)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ConfigError(
            f"subset indices must be a 1-D integer array, got {idx.dtype} {idx.shape}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
        raise ConfigError(f"subset indices must lie in [0, {len(ds)})")
    return ArrayDataset(ds.x[idx], ds.y[idx], ds.mean, ds.std)


_STATS_CHUNK_PIXELS = 1 << 20  # 8 MiB of int64 counts per slice


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``(N, C, H, W)`` images, on [0, 1].

    Computed exactly from a 256-bin histogram per channel, so memory stays at one byte per
    pixel even for large data sets.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    # np.bincount widens its input to int64 (8 bytes a pixel), so count in slices of images.
    step = max(1, _STATS_CHUNK_PIXELS // max(1, int(np.prod(x.shape[2:]))))
    for c in range(x.shape[1]):
        hist = np.zeros(256, dtype=np.float64)
        for i in range(0, len(x), step):
            hist += np.bincount(x[i : i + step, c].ravel(), minlength=256)
        p = hist / max(hist.sum(), 1.0)
        mean = float(p @ levels)
        means.append(mean)
        stds.append(max(float(np.sqrt(p @ (levels - mean) ** 2)), 1e-6))
    return tuple(means), tuple(stds)


def _split_from_arrays(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int | None = None,
    class_names: tuple[str, ...] = (),
) -> DatasetSplit:
    x_train, y_train = train
    x_test, y_test = test
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    mean, std = channel_stats(x_train)
    return DatasetSplit(
        train=ArrayDataset(x_train, y_train, mean, std),
        test=ArrayDataset(x_test, y_test, mean, std),
        num_classes=num_classes,
        in_shape=(int(x_train.shape[1]), int(x_train.shape[2]), int(x_train.shape[3])),
        name=name,
        class_names=class_names,
    )


def _directory(spec: str, raw: str) -> Path:
    if not raw:
        raise ConfigError(f"data set spec {spec!r} needs a directory after the colon")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data set spec {spec!r}: {path} is not a directory")
    return path


def _idx_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path:
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"{directory} has neither {stem} nor {stem}.gz")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ConfigError(
            f"{directory}: {prefix} images must be uint8 (N, H, W), got {images.dtype} "
            f"{images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise ConfigError(
            f"{directory}: {prefix} labels must be {len(images)} integers, got {labels.dtype} "
            f"{labels.shape}"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def load_idx_dir(directory: str | Path, name: str | None = None) -> DatasetSplit:
    """Load the four standard (Fashion-)MNIST IDX files from ``directory``."""
    directory = Path(directory)
    return _split_from_arrays(
        name or f"idx:{directory}", _idx_pair(directory, "train"), _idx_pair(directory, "t10k")
    )


def _cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"CIFAR-10 binary file {path} does not exist")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise ConfigError(
            f"{path} is {raw.size} bytes, not a whole number of {_CIFAR_RECORD}-byte records"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ConfigError(f"{path} has label {labels.max()}; CIFAR-10 labels are 0-9")
    # Each record stores the red, then green, then blue 32x32 plane, row-major: already CHW.
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def load_cifar10_bin(directory: str | Path) -> DatasetSplit:
    """Load the binary CIFAR-10 release from ``directory`` (or its ``cifar-10-batches-bin``)."""
    directory = Path(directory)
    if (directory / "cifar-10-batches-bin").is_dir():
        directory = directory / "cifar-10-batches-bin"
    parts = [_cifar_file(directory / f"data_batch_{i}.bin") for i in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return _split_from_arrays(
        f"cifar10-bin:{directory}",
        train,
        _cifar_file(directory / "test_batch.bin"),
        10,
        CIFAR10_CLASSES,
    )


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _decode_folder(
    split_dir: Path, classes: list[str], mode: str | None, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, str, tuple[int, int]]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ConfigError(
            "reading image folders needs Pillow: pip install 'fedmpq[images]'"
        ) from None
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        class_dir = split_dir / cls
        if not class_dir.is_dir():
            continue
        for path in _image_files(class_dir):
            try:
                with Image.open(path) as img:
                    if mode is None:
                        mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                    if size is None:
                        size = img.size
                    if img.size != size:
                        raise ConfigError(
                            f"{path} is {img.size[0]}x{img.size[1]} pixels, but the data set's "
                            f"images are {size[0]}x{size[1]}; resize them all to one size"
                        )
                    pixels = np.asarray(img.convert(mode), dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise ConfigError(f"cannot decode image {path}: {e}") from None
            images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            labels.append(label)
    if not images or mode is None or size is None:
        raise ConfigError(f"{split_dir} holds no {'/'.join(_IMAGE_SUFFIXES)} images")
    return np.stack(images), np.asarray(labels, dtype=np.int64), mode, size


def load_image_folder(directory: str | Path) -> DatasetSplit:
    """Load ``directory/train/<class>/*`` and ``directory/test/<class>/*`` images.

    Classes are the sorted sub-folder names of ``train``; label ``i`` is the ``i``-th name.
    Images are grayscale if the first one is, RGB otherwise, and must all have one size.
    """
    directory = Path(directory)
    train_dir, test_dir = directory / "train", directory / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise ConfigError(f"image folder data set needs {d} with one sub-folder per class")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    unknown = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise ConfigError(f"{test_dir} has classes not in {train_dir}: {unknown}")
    if len(classes) < 2:
        raise ConfigError(f"{train_dir} needs at least two class sub-folders, found {classes}")
    x_train, y_train, mode, size = _decode_folder(train_dir, classes, None, None)
    x_test, y_test, _, _ = _decode_folder(test_dir, classes, mode, size)
    return _split_from_arrays(
        f"folder:{directory}", (x_train, y_train), (x_test, y_test), len(classes), tuple(classes)
    )


def _load_module(spec: str, target: str) -> DatasetSplit:
    func = load_function("data set spec", spec, target)
    func_name = target.partition(":")[2]
    result = func()
    if not isinstance(result, DatasetSplit):
        raise ConfigError(
            f"data set spec {spec!r}: {func_name}() returned {type(result).__name__}, "
            "expected fedmpq.data.DatasetSplit"
        )
    return result


def load_dataset(spec: str = "fashion-mnist-small") -> DatasetSplit:
    """Load a data set described by ``spec`` (see the module docstring for the forms).

    Parameters
    ----------
    spec
        ``"fashion-mnist-small"``, ``"idx:DIR"``, ``"cifar10-bin:DIR"``, ``"folder:DIR"`` or
        ``"module:pkg.mod:func"``.

    Returns
    -------
    DatasetSplit
        Train and test sets, normalised with the training split's per-channel statistics.

    Raises
    ------
    ConfigError
        For an unknown form, a missing directory or file, or malformed data.
    """
    if spec == "fashion-mnist-small":
        return replace(load_idx_dir(SHIPPED_DIR, name=spec), class_names=FASHION_MNIST_CLASSES)
    form, sep, rest = spec.partition(":")
    if sep:
        if form == "idx":
            return load_idx_dir(_directory(spec, rest))
        if form == "cifar10-bin":
            return load_cifar10_bin(_directory(spec, rest))
        if form == "folder":
            return load_image_folder(_directory(spec, rest))
        if form == "module":
            return _load_module(spec, rest)
    raise ConfigError(f"unknown data set spec {spec!r}; use one of: {', '.join(SPEC_FORMS)}")
