"""Hosts one or many devices in one process: one MQTT loop, one training thread.

A real Raspberry Pi runs one device; fleet emulation runs hundreds per process.
Either way every device is its own MQTT connection and client id, all served by
one selector loop (``fedmpq.mqtt``), and all work that is more than queueing a
message runs on the single worker thread, in arrival order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_client.model_store import ModelStore, ModelStoreError
from edge_client.task import execute_task
from fedmpq import __version__
from fedmpq.errors import DecodeError, FedmpqError
from fedmpq.models import build_model
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.topics import Topics
from fedmpq.wire.codec import DecodeLimits, decode, encode
from fedmpq.wire.messages import (
    ControlMessage,
    DeviceProfile,
    GlobalModelMessage,
    ModelMessage,
    RegisterMessage,
    StatusMessage,
    TaskMessage,
)
from fedmpq.wire.tensors import decode_state

log = logging.getLogger("fedmpq.agent")


@dataclass
class Device:
    """One device: its id, its local data and what it knows of the current run."""

    client_id: str
    x: torch.Tensor
    y: torch.Tensor
    profile: DeviceProfile
    seed: int = 0
    key: bytes | None = None  # signs every frame the device sends (fedmpq.wire.signing)
    connection: Connection | None = None
    registered_run: str = ""
    last_round: int = 0  # rounds count from 1
    pending: TaskMessage | None = None


@dataclass
class AgentOptions:
    broker: BrokerAddress
    topics: Topics
    num_classes: int
    in_shape: tuple[int, int, int]
    protocol: str = "5"
    run_id: str = ""  # only take part in this run ("" = any)
    exit_when_done: bool = False
    report_path: Path | None = None
    model_dir: Path | None = None  # where the trained ONNX model is stored (None: not kept)
    limits: DecodeLimits = field(default_factory=DecodeLimits)


class GlobalModelCache:
    """Decoded global models by fingerprint; identical payloads are decoded once even when
    hundreds of emulated devices in this process each receive their own copy."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._by_fp: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._seen: OrderedDict[bytes, str] = OrderedDict()

    def add(self, payload: bytes, limits: DecodeLimits) -> GlobalModelMessage | None:
        """Decode and cache ``payload``; None if this exact payload was already cached."""
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest in self._seen:
            return None
        msg = decode(payload, GlobalModelMessage, limits)
        self._by_fp[msg.fingerprint] = decode_state(msg.tensors)
        self._seen[digest] = msg.fingerprint
        for cache in (self._by_fp, self._seen):
            while len(cache) > self.keep:
                cache.popitem(last=False)
        return msg

    def get(self, fingerprint: str) -> dict[str, np.ndarray] | None:
        return self._by_fp.get(fingerprint)


class AgentRuntime:
    """Runs ``devices`` until stopped (or, with ``exit_when_done``, until the run ends)."""

    def __init__(self, devices: list[Device], options: AgentOptions) -> None:
        self.devices = devices
        self.options = options
        self.topics = options.topics
        self.inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self.stopped = threading.Event()
        self.models = GlobalModelCache()
        self._nets: dict[str, nn.Module] = {}
        self._report_lock = threading.Lock()
        self._stored_model = ""

    # --- loop thread: queue and return ----------------------------------------------
    def _on_message(self, device: Device, _conn: Connection, topic: str, payload: bytes) -> None:
        self.inbox.put(partial(self._handle, device, topic, payload))

    def _on_connect(self, device: Device, conn: Connection) -> None:
        for topic in self.topics.device_subscriptions(device.client_id):
            conn.subscribe(topic, qos=1)
        self.inbox.put(partial(self._announce, device))

    # --- worker thread -----------------------------------------------------------------
    def _announce(self, device: Device) -> None:
        assert device.connection is not None
        status = StatusMessage(device.client_id, "online", device.last_round, "", time.time())
        device.connection.publish(
            self.topics.status(device.client_id), encode(status, key=device.key), qos=1, retain=True
        )
        self._register(device)

    def _register(self, device: Device) -> None:
        assert device.connection is not None
        msg = RegisterMessage(
            client_id=device.client_id,
            agent_version=__version__,
            profile=device.profile,
            num_samples=len(device.y),
            accepts_zstd=True,
            sent_at=time.time(),
        )
        device.connection.publish(
            self.topics.register(device.client_id), encode(msg, key=device.key), qos=1
        )

    def _handle(self, device: Device, topic: str, payload: bytes) -> None:
        kind, _ = self.topics.parse(topic) or ("unknown", None)
        try:
            if kind == "control":
                self._on_control(device, decode(payload, ControlMessage, self.options.limits))
            elif kind == "global":
                if self.models.add(payload, self.options.limits) is not None:
                    self._run_pending()
            elif kind == "task":
                self._on_task(device, decode(payload, TaskMessage, self.options.limits))
            elif kind == "model":
                self._on_model(device, decode(payload, ModelMessage, self.options.limits))
        except (DecodeError, ModelStoreError) as exc:
            log.warning("%s: rejected %s message: %s", device.client_id, kind, exc)

    def _wanted(self, run_id: str) -> bool:
        return not self.options.run_id or run_id == self.options.run_id

    def _on_control(self, device: Device, msg: ControlMessage) -> None:
        if not self._wanted(msg.run_id):
            return
        if msg.state == "open" and msg.run_id != device.registered_run:
            device.registered_run = msg.run_id
            self._register(device)
        elif msg.state == "finished" and self.options.exit_when_done:
            log.info("run %s finished", msg.run_id)
            self.stopped.set()

    def _on_model(self, device: Device, msg: ModelMessage) -> None:
        """Verify and store the trained model (once per process: devices share the store)."""
        if self.options.model_dir is None or not self._wanted(msg.run_id):
            return
        store = ModelStore(self.options.model_dir)
        if self._stored_model == msg.fingerprint:
            return
        info = {k: getattr(msg, k) for k in ModelStore.INFO_FIELDS}
        stored = store.save(msg.onnx, msg.fingerprint, info)
        self._stored_model = msg.fingerprint
        log.info("%s: stored model of run %s at %s", device.client_id, msg.run_id, stored.path)

    def _on_task(self, device: Device, task: TaskMessage) -> None:
        if not self._wanted(task.run_id) or task.client_id != device.client_id:
            return
        if task.round <= device.last_round:
            log.info("%s: ignoring task for old round %d", device.client_id, task.round)
            return
        device.pending = task
        self._run_pending()

    def _run_pending(self) -> None:
        for device in self.devices:
            task = device.pending
            if task is not None and self.models.get(task.model_fingerprint) is not None:
                device.pending = None
                self._train(device, task)

    def _net(self, model_name: str) -> nn.Module:
        if model_name not in self._nets:
            self._nets[model_name] = build_model(
                model_name, self.options.num_classes, self.options.in_shape
            )
        return self._nets[model_name]

    def _train(self, device: Device, task: TaskMessage) -> None:
        global_state = self.models.get(task.model_fingerprint)
        assert global_state is not None and device.connection is not None
        device.last_round = task.round
        update, result = execute_task(
            task,
            self._net(task.model_name),
            global_state,
            device.x,
            device.y,
            seed=device.seed * 100_003 + task.round,
        )
        data = encode(update, compress=task.compress, key=device.key)
        device.connection.publish(self.topics.update(device.client_id), data, qos=1)
        log.info(
            "%s: round %d trained in %.2f s (loss %.3f), sent %d bytes",
            device.client_id,
            task.round,
            result.seconds,
            result.loss,
            len(data),
        )
        self._report(
            {
                "event": "update",
                "client_id": device.client_id,
                "round": task.round,
                "bytes": len(data),
            }
        )

    def _report(self, row: dict[str, Any]) -> None:
        if self.options.report_path is None:
            return
        with self._report_lock, open(self.options.report_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    # --- lifecycle ---------------------------------------------------------------------
    def run(self) -> None:
        """Connect every device and serve until stopped."""
        loop = MqttLoop()
        loop.start()
        try:
            for device in self.devices:
                will = StatusMessage(device.client_id, "offline", 0, "connection lost", 0.0)
                device.connection = Connection(
                    loop,
                    self.options.broker,
                    device.client_id,
                    on_message=partial(self._on_message, device),
                    on_connect=partial(self._on_connect, device),
                    will=(
                        self.topics.status(device.client_id),
                        encode(will, key=device.key),
                        1,
                        True,
                    ),
                    protocol=self.options.protocol,
                )
                device.connection.connect()
            while not self.stopped.is_set():
                try:
                    job = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    job()
                except FedmpqError as exc:
                    log.error("%s", exc)
                except Exception:
                    # One bad task must not take the device off the fleet.
                    log.exception("job failed")
        finally:
            for device in self.devices:
                if device.connection is not None:
                    offline = StatusMessage(
                        device.client_id, "offline", device.last_round, "", time.time()
                    )
                    device.connection.publish(
                        self.topics.status(device.client_id),
                        encode(offline, key=device.key),
                        qos=1,
                        retain=True,
                    )
                    device.connection.flush(5.0)
                    device.connection.close()
            loop.stop()

    def stop(self) -> None:
        self.stopped.set()
