"""What the agent runtime keeps per hosted device, and the options it runs with."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_client.device import Device
from edge_client.downlink_check import DownlinkCheck
from edge_client.secure_task import SecureTask
from fedmpq.mqtt import BrokerAddress, Connection
from fedmpq.mqtt import Protocol as MqttProtocol
from fedmpq.topics import Topics
from fedmpq.wire.codec import DecodeLimits
from fedmpq.wire.messages import TaskMessage, UpdateMessage

#: The states a device announces on its status topic.
DeviceState = Literal["online", "offline", "rejected", "error"]


@dataclass
class AgentOptions:
    broker: BrokerAddress
    topics: Topics
    num_classes: int
    in_shape: tuple[int, int, int]
    protocol: MqttProtocol = "5"
    run_id: str = ""  # only take part in this run ("" = any)
    exit_when_done: bool = False
    report_path: Path | None = None
    model_dir: Path | None = None  # where the trained ONNX model is stored (None: not kept)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    coordinator_key: bytes | None = None  # Ed25519 public key: every frame received must verify
    secure_dump: Path | None = None  # where a device writes its own codes of a secure round


@dataclass(frozen=True)
class SentUpdate:
    """The update a device sent for a round, and when it went out (monotonic clock)."""

    round: int
    fingerprint: str
    update: UpdateMessage
    frame: bytes
    sent_at: float

    def answers(self, task: TaskMessage) -> bool:
        """Whether this update answers ``task`` (its round, from its model)."""
        return (task.round, task.model_fingerprint) == (self.round, self.fingerprint)


@dataclass
class Session:
    """One hosted device's connection and what it knows of the current run."""

    device: Device
    connection: Connection
    check: DownlinkCheck
    registered_run: str = ""
    last_round: int = 0  # rounds count from 1
    pending: TaskMessage | None = None
    model_topic: str | None = None  # the model_at topic subscribed while a task waits
    last_update: SentUpdate | None = None
    connection_id: str = ""  # nonce of the current connection, in its will and statuses
    # The device's own last statuses (newest last) and what the newest said, so that any
    # other word on its status topic can be answered by saying it again.
    sent_statuses: deque[bytes] = field(default_factory=lambda: deque(maxlen=4))
    last_status: tuple[DeviceState, int, str] | None = None
    secure: SecureTask | None = None  # the device's part in the latest secure round
