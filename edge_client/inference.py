"""On-device inference with the exported ONNX model: onnxruntime and numpy, no torch.

The exported graph (``coordinator.export``) normalises its input itself, so callers
pass raw pixel values (0..255 for 8-bit images) of shape ``(C, H, W)`` or
``(N, C, H, W)``; ``(H, W)`` grey images are accepted too.

Example
-------
>>> from edge_client.inference import Predictor
>>> predictor = Predictor.from_store()          # the model the agent received
>>> predictor.predict(image).top_class          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_client.model_store import ModelStore, default_model_dir
from fedmpq.errors import FedmpqError
from fedmpq.model_metadata import read_class_names


class InferenceError(FedmpqError):
    """Input the model cannot take, or a model file onnxruntime cannot load."""


@dataclass(frozen=True)
class Prediction:
    """Result for one batch: logits ``(N, classes)`` and each sample's top class."""

    logits: np.ndarray

    @property
    def classes(self) -> np.ndarray:
        """Index of the largest logit per sample."""
        return np.asarray(self.logits.argmax(axis=1))

    @property
    def top_class(self) -> int:
        """The top class of the first (usually only) sample."""
        return int(self.classes[0])

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax of the logits."""
        z = self.logits - self.logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))


class Predictor:
    """An onnxruntime session over one exported model.

    Parameters
    ----------
    model
        Path of the ONNX file, or its bytes.
    threads
        Intra-op threads (0 = onnxruntime's default).
    """

    def __init__(self, model: Path | str | bytes, *, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own, unexported exception types
            raise InferenceError(f"onnxruntime cannot load the model: {exc}") from exc
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        if len(inp.shape) != 4:
            raise InferenceError(f"model input of shape {inp.shape}: expected (N, C, H, W)")
        _, c, h, w = inp.shape
        self.input_shape = (int(c), int(h), int(w))
        #: Label names in label order, if the model carries them (else empty).
        self.class_names = read_class_names(self.session.get_modelmeta().custom_metadata_map)

    @classmethod
    def from_store(cls, directory: Path | None = None, *, threads: int = 1) -> Predictor:
        """A predictor for the current model of a model directory (default: the agent's)."""
        stored = ModelStore(directory or default_model_dir()).current()
        return cls(stored.path, threads=threads)

    def label(self, index: int) -> str:
        """The name of class ``index`` if the model carries class names, else the index."""
        return self.class_names[index] if index < len(self.class_names) else str(index)

    def batch(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a float32 ``(N, C, H, W)`` batch of the model's input shape."""
        x = np.asarray(x, dtype=np.float32)
        c, h, w = self.input_shape
        if x.ndim == 2 and c == 1:
            x = x[None]
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (c, h, w):
            raise InferenceError(
                f"input of shape {x.shape} does not fit the model: "
                f"give (C, H, W) or (N, C, H, W) with C, H, W = {c}, {h}, {w}"
            )
        return np.ascontiguousarray(x)

    def predict(self, x: np.ndarray) -> Prediction:
        """Run the model on raw pixel values ``x`` (see :meth:`batch` for shapes)."""
        (logits,) = self.session.run(None, {self.input_name: self.batch(x)})
        return Prediction(np.asarray(logits))


def pixel_range_warning(x: np.ndarray) -> str | None:
    """Why ``x`` does not look like raw pixel values 0..255, or ``None`` if it does.

    Values outside 0..255, or floats all within 0..1 (an image already scaled), still give
    a class, just not a meaningful one.
    """
    if x.size == 0:
        return None
    low, high = float(np.min(x)), float(np.max(x))
    if low < 0 or high > 255:
        return f"input values span {low:g}..{high:g}; the model expects raw pixels 0..255"
    if x.dtype.kind == "f" and 0 < high <= 1:
        return (
            f"input values span {low:g}..{high:g}, as if already scaled to 0..1; the model"
            " expects raw pixels 0..255 (multiply by 255)"
        )
    return None


def load_input(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Read an input for a model of input ``shape``: a ``.npy`` array, or an image.

    Images (PNG, JPEG, ... via Pillow, if installed) are converted to grey or RGB
    as the model's channel count says and resized to its height and width.
    """
    if path.suffix.lower() == ".npy":
        try:
            return np.asarray(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise InferenceError(f"cannot read {path} as a numpy array: {exc}") from exc
    try:
        from PIL import Image
    except ImportError:
        raise InferenceError(
            f"{path}: reading images needs Pillow (pip install pillow); or pass a .npy file"
        ) from None
    c, h, w = shape
    try:
        with Image.open(path) as image:
            image = image.convert("L" if c == 1 else "RGB").resize((w, h))
            pixels = np.asarray(image, dtype=np.float32)
    except OSError as exc:
        raise InferenceError(f"cannot read image {path}: {exc}") from exc
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
