"""A whole round without a broker: the coordinator's round logic and the agent's task
execution, joined by the real wire codec (the MQTT hop itself is covered in
tests/integration)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from benchmarks.round_driver import StartStates, enroll, frames
from coordinator.config import RunConfig, TrainingConfig
from coordinator.engine import RoundEngine
from coordinator.mqtt_service import MqttCoordinator
from edge_client.task import execute_task
from fedmpq.data.datasets import load_dataset, subset
from fedmpq.models import build_model
from fedmpq.mqtt import BrokerAddress
from fedmpq.topics import UPDATE
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import (
    DeviceProfile,
    RegisterMessage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.signing import generate_coordinator_key, generate_keys, write_keyring

PROFILE = DeviceProfile(2**31, 2**30, 4, 1500.0, 0.0, 10.0, "linux", "aarch64")
BROKER = BrokerAddress.parse("mqtt://127.0.0.1:1")


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion-mnist-small")


def make_coordinator(tmp_path, policy, keys=None):
    key_file = ""
    if keys is not None:
        key_file = str(tmp_path / "keys.toml")
        private, public = generate_coordinator_key()
        write_keyring(key_file, keys, coordinator_public=public, coordinator_private=private)
    config = RunConfig(
        device_keys=key_file,
        run_id="unit",
        model="mlp",
        rounds=1,
        min_clients=2,
        out_dir=str(tmp_path),
        policy=policy,
        training=TrainingConfig(epochs=1, batch_size=64, learning_rate=0.05),
    )
    coordinator = RoundEngine(config)
    for cid in ("dev-a", "dev-b"):
        reg = RegisterMessage(cid, "test", PROFILE, 600, True, time.time())
        key = keys[cid] if keys else None
        enroll(coordinator, reg, key)
    return coordinator


def run_clients(coordinator, data, models, tasks, keys=None):
    """Each selected client trains on its 600 samples; returns the encoded updates."""
    torch.set_num_threads(1)
    starts = StartStates(models)
    updates = {}
    for i, (cid, raw) in enumerate(sorted(tasks.items())):
        task = decode(raw, TaskMessage)
        net = build_model(task.model_name, data.num_classes, data.in_shape)
        x, y = subset(data.train, np.arange(600 * i, 600 * (i + 1))).tensors()
        update, _ = execute_task(task, net, starts.of(task), x, y, seed=i)
        updates[cid] = encode(update, key=keys[cid] if keys else None)
    return updates


@pytest.mark.parametrize("policy", [{"name": "fixed", "bits": 4}, {"name": "float32"}])
def test_one_round_end_to_end_without_broker(tmp_path, data, policy):
    coordinator = make_coordinator(tmp_path, policy)
    before, _ = coordinator.evaluate()
    models, tasks = frames(coordinator.open_round(1))
    updates = run_clients(coordinator, data, models, tasks)
    for cid, payload in updates.items():
        coordinator.receive(UPDATE, cid, payload)
    assert coordinator.tick() == [] and coordinator.done()
    row = coordinator.close_round()
    assert row["participants"] == ["dev-a", "dev-b"]
    assert row["uplink_bytes"] == sum(len(u) for u in updates.values())
    assert row["loss"] < before
    assert row["rejected"] == {}


def test_bad_updates_are_rejected_and_the_round_goes_on(tmp_path, data):
    coordinator = make_coordinator(tmp_path, {"name": "fixed", "bits": 4})
    models, tasks = frames(coordinator.open_round(1))
    updates = run_clients(coordinator, data, models, tasks)
    # Through the MQTT adapter's handler (not connected): topics are checked there.
    service = MqttCoordinator(coordinator.config, BROKER, engine=coordinator)
    topics = service.topics
    service.handle(topics.update("dev-b"), updates["dev-a"])  # dev-b speaks for dev-a
    service.handle(topics.update("dev-a"), updates["dev-a"][:-7])  # truncated
    service.handle(topics.update("dev-a"), b"\x00garbage")
    service.handle(topics.update("dev-a"), updates["dev-a"])
    service.handle(topics.update("dev-a"), updates["dev-a"])  # replay within the round
    service.handle("elsewhere/update/dev-a", updates["dev-a"])
    service.handle(topics.update("dev-b"), updates["dev-b"])
    row = coordinator.close_round()
    assert row["participants"] == ["dev-a", "dev-b"]
    assert row["rejected"] == {"spoofed": 1, "malformed": 2, "duplicate": 1, "topic": 1}
    # A late update for the closed round is stale.
    service.handle(topics.update("dev-a"), updates["dev-a"])
    assert coordinator.rejections.counts["stale"] == 1


def test_signed_updates_only_from_their_own_device(tmp_path, data):
    keys = generate_keys(["dev-a", "dev-b"])
    coordinator = make_coordinator(tmp_path, {"name": "fixed", "bits": 4}, keys)
    assert len(coordinator.registry.online()) == 2
    models, tasks = frames(coordinator.open_round(1))
    updates = run_clients(coordinator, data, models, tasks, keys)
    update_a = decode(updates["dev-a"], UpdateMessage)
    forged = encode(update_a, key=keys["dev-b"])  # dev-b's key, dev-a's update and topic
    coordinator.receive(UPDATE, "dev-a", forged)
    coordinator.receive(UPDATE, "dev-a", encode(update_a))  # unsigned
    coordinator.receive(UPDATE, "dev-c", updates["dev-a"])  # not enrolled
    for cid, payload in updates.items():
        coordinator.receive(UPDATE, cid, payload)
    row = coordinator.close_round()
    assert row["participants"] == ["dev-a", "dev-b"]
    assert row["rejected"] == {"bad_signature": 2, "unknown_device": 1}


def test_update_beyond_the_norm_bound_never_touches_the_model(tmp_path, data):
    coordinator = make_coordinator(tmp_path, {"name": "fixed", "bits": 4})
    coordinator.config.max_update_norm = 1e-6
    before = {k: v.copy() for k, v in coordinator.global_state.items()}
    models, tasks = frames(coordinator.open_round(1))
    for cid, payload in run_clients(coordinator, data, models, tasks).items():
        coordinator.receive(UPDATE, cid, payload)
    row = coordinator.close_round()
    assert row["rejected"] == {"norm": 2}
    assert row["participants"] == []
    assert all(np.array_equal(before[k], coordinator.global_state[k]) for k in before)


def test_short_of_quorum_a_replacement_device_completes_the_round(tmp_path, data):
    coordinator = make_coordinator(tmp_path, {"name": "fixed", "bits": 4})
    coordinator.config.quorum = 1.0
    reg = RegisterMessage("dev-c", "test", PROFILE, 600, True, time.time())
    enroll(coordinator, reg)
    devices = coordinator.registry.devices
    models, tasks = frames(coordinator.open_round(1, [devices["dev-a"], devices["dev-b"]]))
    assert coordinator.round_state.quorum_target == 2
    first = run_clients(coordinator, data, models, tasks)
    coordinator.receive(UPDATE, "dev-a", first["dev-a"])  # dev-b never answers
    retry = {m.client_id: m.payload for m in coordinator.extend_round([devices["dev-c"]])}
    assert set(retry) == {"dev-c"}
    second = run_clients(coordinator, data, models, retry)
    coordinator.receive(UPDATE, "dev-c", second["dev-c"])
    row = coordinator.close_round()
    assert row["participants"] == ["dev-a", "dev-c"]
    assert row["counted"] is True
