"""Every policy through the real round pipeline (coordinator + execute_task + wire codec),
and budgets: explicit, derived from the profile, and devices told they do not fit."""

import time

import numpy as np
import pytest
import torch

from benchmarks.round_driver import SimDevice, enroll, frames, register, run_round
from coordinator.config import RunConfig, TrainingConfig
from coordinator.engine import RoundEngine
from fedmpq.data.datasets import load_dataset, subset
from fedmpq.errors import ConfigError
from fedmpq.policies import policy_names
from fedmpq.topics import UPDATE
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import DeviceProfile, NoticeMessage, RegisterMessage

STRONG = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64", None, 1e6, 1e7)
TINY = DeviceProfile(2**27, 2**26, 1, 700.0, 0.0, 0.5, "linux", "armv6l")  # 64 MiB free


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion-mnist-small")


def coordinator_for(tmp_path, policy, **extra):
    config = RunConfig(
        run_id="unit",
        model="mlp",
        rounds=2,
        out_dir=str(tmp_path),
        publish_onnx=False,
        policy=policy,
        training=TrainingConfig(epochs=1, batch_size=64, learning_rate=0.05),
        **extra,
    )
    return RoundEngine(config)


def devices_for(data, profiles):
    torch.set_num_threads(1)
    out = {}
    for i, profile in enumerate(profiles):
        x, y = subset(data.train, np.arange(300 * i, 300 * (i + 1))).tensors()
        out[f"dev-{i}"] = SimDevice(f"dev-{i}", x, y, profile, seed=i)
    return out


@pytest.mark.parametrize("name", sorted(set(policy_names())))
def test_each_policy_runs_two_rounds_with_heterogeneous_budgets(tmp_path, data, name):
    policy = {"name": name, "use_budget": True} if name == "fixed" else {"name": name}
    coordinator = coordinator_for(tmp_path, policy, budgets=[2.0, 5.0, 8.0])
    devices = devices_for(data, [STRONG] * 3)
    register(coordinator, list(devices.values()))
    before, _ = coordinator.evaluate()
    for r in (1, 2):
        row = run_round(coordinator, devices, r)
        assert row["participants"] == ["dev-0", "dev-1", "dev-2"]
        assert row["rejected"] == {} and row["excluded"] == {}
    assert row["loss"] < before
    if name != "float32":
        # Every client's update respected its budget (wire bits, parameter-weighted).
        for cid, budget in zip(sorted(devices), [2.0, 5.0, 8.0], strict=True):
            assert row["client_bits"][cid] <= budget + 1e-9
    if name == "fedmpq":
        assert coordinator.policy.mean_bits  # learned from the reported bits


def test_explicit_budgets_by_client_id_override_the_list(tmp_path):
    coordinator = coordinator_for(
        tmp_path,
        {"name": "fixed", "use_budget": True},
        budgets=[3.0, 3.0],
        client_budgets={"dev-1": 7.0},
    )
    for cid in ("dev-0", "dev-1"):
        reg = RegisterMessage(cid, "test", STRONG, 100, True, time.time())
        enroll(coordinator, reg)
    records = {d.client_id: d for d in coordinator.registry.online()}
    assert coordinator.messages.client_budget(records["dev-0"]) == 3.0
    assert coordinator.messages.client_budget(records["dev-1"]) == 7.0
    _, tasks = frames(coordinator.open_round(1, list(records.values())))
    assert set(decode(tasks["dev-1"]).bits.values()) == {7}


def test_a_device_too_small_for_one_bit_is_told_and_left_out(tmp_path, data, caplog):
    coordinator = coordinator_for(tmp_path, {"name": "fedmpq"})
    devices = devices_for(data, [STRONG, TINY])
    register(coordinator, list(devices.values()))
    with caplog.at_level("WARNING", logger="fedmpq.coordinator"):
        row = run_round(coordinator, devices, 1)
    assert row["participants"] == ["dev-0"]
    assert set(row["excluded"]) == {"dev-1"} and "RAM" in row["excluded"]["dev-1"]
    assert "RAM" in row["notices"]["dev-1"]
    assert "dev-1 not selected" in caplog.text
    assert row["counted"]


def test_budgets_outside_1_to_8_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="budgets"):
        coordinator_for(tmp_path, {"name": "fedmpq"}, budgets=[0.5])


def test_notice_round_trips_through_the_codec():
    notice = NoticeMessage("run", "dev-1", 3, "too small")
    assert decode(encode(notice), NoticeMessage) == notice


@pytest.mark.parametrize("anchored", [True, False])
def test_anchored_aggregation_keeps_what_quantizing_the_start_lost(tmp_path, anchored):
    from fedmpq.wire.messages import ResourceUsage, UpdateMessage
    from fedmpq.wire.tensors import decode_state, encode_state

    coordinator = coordinator_for(
        tmp_path, {"name": "fixed", "bits": 2, "anchored": anchored}, observer="mse"
    )
    reg = RegisterMessage("dev-0", "test", STRONG, 100, True, time.time())
    enroll(coordinator, reg)
    start = dict(coordinator.global_state)
    _, tasks = frames(coordinator.open_round(1, coordinator.registry.online()))
    task = decode(tasks["dev-0"])
    assert task.observer == "mse"
    # A client that learned nothing sends its quantized starting point back.
    tensors = encode_state(start, task.bits, observer=task.observer)
    update = UpdateMessage(
        "unit",
        1,
        "dev-0",
        100,
        task.model_fingerprint,
        "weights",
        tensors,
        ResourceUsage(0.0, 0, 0.0),
        {},
        token=task.token,
    )
    coordinator.receive(UPDATE, "dev-0", encode(update))
    coordinator.close_round()
    quantized = decode_state(tensors)
    for name in task.bits:
        if anchored:  # nothing learned, nothing changed
            np.testing.assert_allclose(coordinator.global_state[name], start[name], atol=1e-6)
        else:  # the model became its own 2-bit quantization
            np.testing.assert_allclose(coordinator.global_state[name], quantized[name], rtol=1e-6)
            assert not np.allclose(quantized[name], start[name])
