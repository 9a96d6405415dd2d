"""fedmpq agent predict: label names from the model's ONNX metadata, and a warning for
input that is not raw pixels 0..255."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.export import build_onnx
from coordinator.model_release import input_spec
from edge_client.inference import Predictor, pixel_range_warning
from fedmpq.data.datasets import FASHION_MNIST_CLASSES, load_dataset
from fedmpq.model_metadata import class_names_metadata, read_class_names
from fedmpq.models import build_model, quantizable_layers


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = load_dataset("fashion-mnist-small")
    assert data.class_names == FASHION_MNIST_CLASSES
    model = build_model("mlp", data.num_classes, data.in_shape)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    bits = dict.fromkeys(quantizable_layers(model), 8)
    meta = class_names_metadata(data.class_names)
    exported = build_onnx(model, state, bits, input_spec(data), metadata=meta)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    path.write_bytes(exported.onnx_bytes)
    return path


def _predict(
    model: Path, x: np.ndarray, tmp_path: Path, *flags: str
) -> subprocess.CompletedProcess:
    np.save(tmp_path / "x.npy", x)
    command = [sys.executable, "-m", "fedmpq.cli", "agent", "predict", str(tmp_path / "x.npy")]
    return subprocess.run(
        [*command, "--model", str(model), *flags], capture_output=True, text=True, check=True
    )


def test_prints_the_label_name_the_model_carries(model_file: Path, tmp_path: Path) -> None:
    x = np.full((1, 28, 28), 128, dtype=np.uint8)
    predictor = Predictor(model_file)
    assert predictor.class_names == FASHION_MNIST_CLASSES
    expected = FASHION_MNIST_CLASSES[predictor.predict(x).top_class]
    out = _predict(model_file, x, tmp_path)
    assert out.stdout.strip() == expected
    assert out.stderr == ""
    row = json.loads(_predict(model_file, x, tmp_path, "--json").stdout)
    assert row["labels"] == [expected]


def test_warns_on_input_scaled_to_one(model_file: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((1, 28, 28)).astype(np.float32)
    out = _predict(model_file, x, tmp_path)
    assert "warning" in out.stderr and "0..1" in out.stderr
    assert out.stdout.strip() in FASHION_MNIST_CLASSES


@pytest.mark.parametrize(
    ("x", "warned"),
    [
        (np.array([0, 255], dtype=np.uint8), False),
        (np.array([0.0, 200.0]), False),
        (np.array([0.0, 0.0]), False),
        (np.array([0.0, 0.5, 1.0]), True),
        (np.array([-1.0, 3.0]), True),
        (np.array([0.0, 300.0]), True),
    ],
)
def test_pixel_range_warning(x: np.ndarray, warned: bool) -> None:
    assert (pixel_range_warning(x) is not None) == warned


def test_class_names_metadata_round_trip_and_junk() -> None:
    assert read_class_names(class_names_metadata(["a", "b"])) == ("a", "b")
    assert class_names_metadata([]) == {}
    assert read_class_names({}) == ()
    assert read_class_names({"class_names": "not json"}) == ()
    assert read_class_names({"class_names": "[1, 2]"}) == ()
