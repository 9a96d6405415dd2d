"""Seeded 3-round runs through the in-process round driver end in the same global
model as before the coordinator was split into the round engine and its adapter
(fingerprints recorded from the code before the change)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.round_driver import SimDevice, register, run_round
from coordinator.config import RunConfig, TrainingConfig
from coordinator.engine import RoundEngine
from fedmpq.data.datasets import load_dataset, subset
from fedmpq.state import fingerprint
from fedmpq.wire.messages import DeviceProfile

STRONG = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64", None, 1e6, 1e7)
PINNED = {
    ("mlp", "fixed"): ("b6a5bceb0ec9516d07cf6fe54e6e1739", 0.577, [4.0, 4.0, 4.0]),
    ("mlp", "fedmpq"): ("12b00c1cbe43611d711c1528c1588a7f", 0.612, [2.0, 4.0, 6.0]),
    ("cnn", "fixed"): ("2094182dc96b6407ff1247a98b46d37a", 0.518, [4.0, 4.0, 4.0]),
    ("cnn", "fedmpq"): ("dd59d2207c9b9bb88cae79ffa2aeb65f", 0.265, [2.0, 4.0, 6.0]),
}


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion-mnist-small")


@pytest.mark.parametrize(("model", "policy"), sorted(PINNED))
def test_seeded_three_rounds_end_in_the_pinned_model(tmp_path, data, model, policy):
    torch.set_num_threads(1)
    params = {"name": "fixed", "bits": 4} if policy == "fixed" else {"name": policy}
    config = RunConfig(
        run_id="pin",
        model=model,
        rounds=3,
        seed=7,
        out_dir=str(tmp_path),
        publish_onnx=False,
        policy=params,
        budgets=[2.0, 4.0, 6.0],
        training=TrainingConfig(epochs=1, batch_size=32, learning_rate=0.05),
    )
    engine = RoundEngine(config)
    devices = {}
    for i in range(3):
        x, y = subset(data.train, np.arange(200 * i, 200 * (i + 1))).tensors()
        devices[f"dev-{i}"] = SimDevice(f"dev-{i}", x, y, STRONG, seed=i)
    register(engine, list(devices.values()))
    for r in (1, 2, 3):
        row = run_round(engine, devices, r)
    expected_fp, expected_accuracy, expected_bits = PINNED[(model, policy)]
    assert row["client_bits"] == dict(zip(sorted(devices), expected_bits, strict=True))
    assert row["accuracy"] == expected_accuracy
    assert fingerprint(engine.global_state) == expected_fp
