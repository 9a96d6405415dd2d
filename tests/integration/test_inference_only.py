"""An inference-only device: torch cannot be imported at all, yet the device receives the
published model over real mosquitto, verifies and stores it, and classifies with it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from coordinator.export import build_onnx
from coordinator.model_release import input_spec, model_message
from edge_client.inference import Predictor
from edge_client.model_delivery import store_model_message
from edge_client.model_store import ModelStore, ModelStoreError
from fedmpq.data.datasets import load_dataset
from fedmpq.models import build_model, quantizable_layers
from fedmpq.mqtt import Connection, MqttLoop
from fedmpq.state import state_to_numpy
from fedmpq.topics import Topics
from fedmpq.wire.codec import encode

# Runs fedmpq's CLI in a Python where importing torch fails, as on a device without it.
NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from fedmpq.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules and "onnx" not in sys.modules
sys.exit(code)
"""


def _no_torch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def message():
    data = load_dataset("fashion-mnist-small")
    torch.manual_seed(0)
    model = build_model("cnn", data.num_classes, data.in_shape)
    bits = dict.fromkeys(quantizable_layers(model), 4)
    exported = build_onnx(model, state_to_numpy(model), bits, input_spec(data))
    return model_message(exported, input_spec(data), run_id="pi", round=2, model_name="cnn")


def test_device_without_torch_fetches_and_predicts(mosquitto_factory, message, tmp_path):
    broker = mosquitto_factory()
    with MqttLoop() as loop:
        coordinator = Connection(loop, broker.address, "coordinator", on_message=lambda *a: None)
        coordinator.connect()
        coordinator.publish(Topics().model, encode(message, compress=True), qos=1, retain=True)
        assert coordinator.flush(30)
        coordinator.close()
    model_dir = tmp_path / "model"
    fetched = _no_torch(
        "agent", "fetch-model", "--broker", broker.url, "--client-id", "pi-01",
        "--model-dir", str(model_dir), "--run-id", "pi", "--timeout", "60",
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    stored = ModelStore(model_dir).current()
    assert stored.fingerprint == message.fingerprint and stored.round == 2
    x = load_dataset("fashion-mnist-small").test.x[:5]
    np.save(tmp_path / "x.npy", x)
    predicted = _no_torch(
        "agent", "predict", str(tmp_path / "x.npy"), "--model-dir", str(model_dir)
    )
    assert predicted.returncode == 0, predicted.stderr
    expected = Predictor(message.onnx).predict(x).classes
    assert [int(c) for c in predicted.stdout.split()] == expected.tolist()
    # Training is what needs torch, and says so.
    training = _no_torch("agent", "--broker", broker.url)
    assert training.returncode == 2 and "fedmpq[train]" in training.stderr


def test_a_model_that_fails_its_fingerprint_is_not_stored(message, tmp_path):
    store = ModelStore(tmp_path / "model")
    tampered = encode(dataclasses.replace(message, onnx=message.onnx + b"\0"))
    with pytest.raises(ModelStoreError, match="fingerprint"):
        store_model_message(tampered, store)
    assert not (tmp_path / "model").exists()
    assert store_model_message(encode(message), store, run_id="another-run") is None
    assert store_model_message(encode(message), store, run_id="pi").fingerprint == (
        message.fingerprint
    )
