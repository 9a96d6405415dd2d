"""Seeded 3-round runs through the in-process round driver end in the pinned global model.

Pinned first before the coordinator was split into the round engine and its adapter;
re-pinned when the downlink became quantized (devices start from Q_b(w) spread within
its cells, and fixed aggregates anchored): the 20-round demo keeps its accuracy (86.1%),
these 3-round toy runs of 200 samples a device move by a few points either way; re-pinned
for fedmpq when it followed the authors' code (its allocations now adapt below the budgets,
and this toy cnn run dips to 9% in round 3 before recovering to 35% by round 6: the pin is
about determinism, accuracy is judged in benchmarks/accuracy_per_bit.py); re-pinned when
per-channel steps went onto the wire's log grid (fedmpq.quant_scales: each channel's step
rounded down to a power of 2**(1/16), its largest weights saturating, so that the scales
travel in a byte each): every per-channel quantization moved by up to 4.2% of a channel's
range, and these toy runs with it (round 3: cnn fedmpq 9.2 -> 49.8%, no dip; cnn fixed
49.0 -> 54.9%; mlp within a point; fixed:4 after 20 demo rounds: see the README's demo);
re-pinned for fedmpq when its re-allocation kept two planes (``min_bits = 3``) and its
lasso stopped shrinking layers (``keep_norm``): the 4-bit device now sends 3.0 bits, not
2.3-2.9 (round 3: mlp 61.3 -> 63.2%, cnn 49.8 -> 42.0%)."""

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
    ("mlp", "fixed"): ("94fe758b0e1d30d1f7ab2f5cf5ec005e", 0.572, [4.0, 4.0, 4.0]),
    ("mlp", "fedmpq"): ("4f334af61d2a14c8a15da656ceed60b5", 0.6315, [2.0, 3.0, 4.845]),
    ("cnn", "fixed"): ("33a067b15c3a7c7a7141e1ba9e9c8da7", 0.5485, [4.0, 4.0, 4.0]),
    ("cnn", "fedmpq"): ("bd9ee74a27790216a115093bca67e50e", 0.4195, [2.0, 3.0, 4.178]),
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
