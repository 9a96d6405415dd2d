"""Rounds in one process, through the real code: the coordinator's ``RoundEngine``
(``open_round`` / ``receive`` / ``close_round``) on one side,
``edge_client.task.execute_task`` on the other, joined by the real wire codec --
everything but the MQTT hop (covered by tests/integration).

Each simulated device keeps its own policy memory (error feedback), as an agent's
``Device.memory`` does.  The emulated wall time of a round is the slowest selected
client's compute time (``fedmpq.resources.training_seconds`` at its profile's GFLOPS)
plus its task + global model download and its update upload over its profile's
links (``fedmpq.resources.transfer_seconds``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from coordinator.engine import RoundEngine
from coordinator.events import Outgoing
from edge_client.task import execute_task
from fedmpq.models import build_model
from fedmpq.resources import training_seconds, transfer_seconds
from fedmpq.topics import MODEL_AT, REGISTER, STATUS, TASK, UPDATE
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import (
    DeviceProfile,
    GlobalModelMessage,
    NoticeMessage,
    RegisterMessage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.tensors import decode_state


@dataclass
class SimDevice:
    """One simulated device: its data, profile and policy memory."""

    client_id: str
    x: torch.Tensor
    y: torch.Tensor
    profile: DeviceProfile
    seed: int = 0
    memory: dict[str, np.ndarray] = field(default_factory=dict)


def register(coordinator: RoundEngine, devices: list[SimDevice]) -> None:
    """Register every device with the coordinator through a register frame."""
    for d in devices:
        msg = RegisterMessage(d.client_id, "sim", d.profile, len(d.y), True, time.time())
        enroll(coordinator, msg)


def enroll(coordinator: RoundEngine, msg: RegisterMessage, key: bytes | None = None) -> None:
    """Send ``msg`` and answer what comes back as an agent does: a notice (the liveness
    probe of an unsigned registration) with a ``rejected`` status echoing its reason."""
    for out in coordinator.receive(REGISTER, msg.client_id, encode(msg, key=key)):
        notice = decode(out.payload)
        if isinstance(notice, NoticeMessage):
            status = StatusMessage(msg.client_id, "rejected", notice.round, notice.reason, 0.0)
            coordinator.receive(STATUS, msg.client_id, encode(status, key=key))


def frames(sent: list[Outgoing]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The global models by allocation key and the per-device frames (tasks, notices) of
    ``sent``."""
    models = {
        m.client_id: m.payload for m in sent if m.kind == MODEL_AT and m.client_id is not None
    }
    tasks = {m.client_id: m.payload for m in sent if m.kind == TASK and m.client_id is not None}
    return models, tasks


class StartStates:
    """The decoded models of one round's ``models`` (from :func:`frames`), by allocation."""

    def __init__(self, models: dict[str, bytes]) -> None:
        self.models = models
        self._decoded: dict[str, dict[str, np.ndarray]] = {}

    def of(self, task: TaskMessage) -> dict[str, np.ndarray]:
        """The state ``task``'s device starts from (its allocation's model)."""
        key = task.model_allocation
        if key not in self._decoded:
            msg = decode(self.models[key], GlobalModelMessage)
            self._decoded[key] = decode_state(msg.tensors)
        return self._decoded[key]


def run_round(
    coordinator: RoundEngine, devices: dict[str, SimDevice], round: int
) -> dict[str, Any]:
    """Run ``round`` for the coordinator's selection; return its metrics row, extended with
    ``emulated_round_s``, ``sent_bits`` (per client, per layer, as sent) and
    ``notices`` (clients told they were left out), ``emulated_upload_s`` (the
    slowest upload) and ``emulated_slowest_parts_s`` (the slowest client's compute,
    download and upload seconds)."""
    models, tasks = frames(coordinator.open_round(round))
    starts = StartStates(models)
    nets: dict[str, nn.Module] = {}
    slowest = slowest_upload = 0.0
    slowest_parts = (0.0, 0.0, 0.0)
    sent_bits: dict[str, dict[str, int]] = {}
    notices: dict[str, str] = {}
    for cid, raw in sorted(tasks.items()):
        msg = decode(raw)
        if isinstance(msg, NoticeMessage):
            notices[cid] = msg.reason
            continue
        assert isinstance(msg, TaskMessage)
        device = devices[cid]
        if msg.model_name not in nets:
            data = coordinator.workload.data
            nets[msg.model_name] = build_model(msg.model_name, data.num_classes, data.in_shape)
        update, _ = execute_task(
            msg,
            nets[msg.model_name],
            starts.of(msg),
            device.x,
            device.y,
            seed=device.seed * 100_003 + round,
            memory=device.memory,
        )
        payload = encode(update)
        coordinator.receive(UPDATE, cid, payload)
        sent_bits[cid] = {p.name: p.bits for p in decode(payload, UpdateMessage).tensors}
        compute, down, up = emulated_seconds(
            coordinator, device, msg, len(models[msg.model_allocation]) + len(raw), len(payload)
        )
        if compute + down + up > slowest:
            slowest, slowest_parts = compute + down + up, (compute, down, up)
        slowest_upload = max(slowest_upload, up)
    row = coordinator.close_round()
    row["emulated_round_s"] = slowest
    row["emulated_upload_s"] = slowest_upload
    row["emulated_slowest_parts_s"] = list(slowest_parts)
    row["sent_bits"] = sent_bits
    row["notices"] = notices
    return row


def emulated_seconds(
    coordinator: RoundEngine, device: SimDevice, task: TaskMessage, down: int, up: int
) -> tuple[float, float, float]:
    """Compute, download and upload time of one client's round on its profile."""
    p = device.profile
    compute = training_seconds(coordinator.workload.cost, len(device.y), task.epochs, p.gflops)
    latency = p.latency_s or 0.0
    down_s = transfer_seconds(down, p.downlink_bps, latency) if p.downlink_bps else 0.0
    up_s = transfer_seconds(up, p.uplink_bps, latency) if p.uplink_bps else 0.0
    return compute, down_s, up_s
