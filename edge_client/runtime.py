"""Hosts one or many devices in one process: one MQTT loop, one training thread.

A real Raspberry Pi runs one device; fleet emulation runs hundreds per process.
Either way every device is its own MQTT connection and client id, all served by
one selector loop (``fedmpq.mqtt``), and all work that is more than queueing a
message runs on the single worker thread, in arrival order.
"""

from __future__ import annotations

import dataclasses
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

from edge_client.emulation import EmulatedDevice
from edge_client.memory import fit_batch_size, free_memory_bytes
from edge_client.model_store import ModelStore, ModelStoreError
from edge_client.task import execute_task
from fedmpq import __version__
from fedmpq.errors import BudgetError, DecodeError, FedmpqError
from fedmpq.models import build_model
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.resources import ModelCost, model_cost
from fedmpq.topics import Topics
from fedmpq.wire.codec import DecodeLimits, decode, encode
from fedmpq.wire.messages import (
    STATUS_CONNECTED,
    ControlMessage,
    DeviceProfile,
    GlobalModelMessage,
    ModelMessage,
    NoticeMessage,
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
    last_update: tuple[int, str, bytes] | None = None  # (round, global fingerprint, frame)
    memory: dict[str, np.ndarray] = field(default_factory=dict)  # policy state (error feedback)
    emulation: EmulatedDevice | None = None  # set when the device emulates a profile


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
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # payload digest -> its round
        self.latest_round = 0  # round of the payload the last add() was given

    def add(self, payload: bytes, limits: DecodeLimits) -> GlobalModelMessage | None:
        """Decode and cache ``payload``; None if this exact payload was already cached."""
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest in self._seen:
            self.latest_round = self._seen[digest]
            return None
        msg = decode(payload, GlobalModelMessage, limits)
        self._by_fp[msg.fingerprint] = decode_state(msg.tensors)
        self._seen[digest] = self.latest_round = msg.round
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
        self._costs: dict[str, ModelCost] = {}
        self._warmed: set[str] = set()  # models this process has trained once, untimed
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
        status = StatusMessage(
            device.client_id, "online", device.last_round, STATUS_CONNECTED, time.time()
        )
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
                if device.emulation is not None:
                    self._emulated_round(device, self.models.latest_round, len(payload))
            elif kind == "task":
                if device.emulation is not None:
                    device.emulation.task_received(len(payload))
                msg = decode(payload, None, self.options.limits)
                if isinstance(msg, NoticeMessage):
                    self._on_notice(device, msg)
                elif isinstance(msg, TaskMessage):
                    self._on_task(device, msg)
                else:
                    raise DecodeError(f"task topic: unexpected {type(msg).__name__}")
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

    def _on_notice(self, device: Device, msg: NoticeMessage) -> None:
        """The coordinator left this device out of a round: log why, answer "rejected"."""
        if not self._wanted(msg.run_id) or msg.client_id != device.client_id:
            return
        assert device.connection is not None
        log.warning("%s: not selected for round %d: %s", device.client_id, msg.round, msg.reason)
        status = StatusMessage(device.client_id, "rejected", msg.round, msg.reason, time.time())
        device.connection.publish(
            self.topics.status(device.client_id), encode(status, key=device.key), qos=1
        )

    def _on_task(self, device: Device, task: TaskMessage) -> None:
        if not self._wanted(task.run_id) or task.client_id != device.client_id:
            return
        sent = device.last_update
        if sent is not None and (task.round, task.model_fingerprint) == sent[:2]:
            # The coordinator asks again (it restarted, or the broker lost our update):
            # the same update again, which the coordinator aggregates at most once.
            log.info("%s: re-sending update of round %d", device.client_id, task.round)
            device.connection.publish(self.topics.update(device.client_id), sent[2], qos=1)
            return
        if task.round <= device.last_round:
            log.info("%s: ignoring task for old round %d", device.client_id, task.round)
            return
        if device.emulation is not None and not device.emulation.online:
            log.info("%s: emulated offline, task of round %d unseen", device.client_id, task.round)
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

    def _cost(self, model_name: str) -> ModelCost:
        if model_name not in self._costs:
            self._costs[model_name] = model_cost(self._net(model_name), self.options.in_shape)
        return self._costs[model_name]

    def _publish_status(self, device: Device, state: str, round: int, detail: str) -> None:
        assert device.connection is not None
        status = StatusMessage(device.client_id, state, round, detail, time.time())
        device.connection.publish(
            self.topics.status(device.client_id), encode(status, key=device.key), qos=1, retain=True
        )

    def _emulated_round(self, device: Device, round: int, global_bytes: int) -> None:
        """Round ``round`` opened: announce the emulated device's availability for the next."""
        assert device.emulation is not None
        online = device.emulation.open_round(round, global_bytes)
        if online is None:
            return
        self._publish_status(device, "online" if online else "offline", round + 1, "emulated churn")
        self._report(
            {"event": "availability", "client_id": device.client_id, "round": round + 1}
            | {"online": online}
        )

    def _fit(self, device: Device, task: TaskMessage) -> TaskMessage | None:
        """``task`` adapted to the device's free memory, or None (refused, status sent)."""
        free = device.emulation.available_ram if device.emulation else free_memory_bytes()
        try:
            batch = fit_batch_size(task, self._cost(task.model_name), free)
        except BudgetError as exc:
            log.warning("%s: refused round %d: %s", device.client_id, task.round, exc)
            self._publish_status(device, "rejected", task.round, str(exc))
            self._report({"event": "rejected", "client_id": device.client_id, "round": task.round})
            return None
        if batch != task.batch_size:
            log.info("%s: batch %d -> %d to fit memory", device.client_id, task.batch_size, batch)
        return dataclasses.replace(task, batch_size=batch)

    def _train(self, device: Device, task: TaskMessage) -> None:
        global_state = self.models.get(task.model_fingerprint)
        assert global_state is not None and device.connection is not None
        device.last_round = task.round
        emulation = device.emulation
        if emulation is not None and emulation.crashes():
            # What the broker would publish as the crashed board's last will.
            self._publish_status(device, "offline", task.round, "crashed (emulated)")
            self._report({"event": "crash", "client_id": device.client_id, "round": task.round})
            return
        fitted = self._fit(device, task)
        if fitted is None:
            return
        task = fitted
        if emulation is not None and task.model_name not in self._warmed:
            # A process's first task pays one-off costs (lazy imports, kernel set-up) that a
            # device training every round does not: pay them here, on one sample, untimed.
            net = self._net(task.model_name)
            execute_task(task, net, global_state, device.x[:1], device.y[:1], seed=0, memory={})
            self._warmed.add(task.model_name)
        cpu_start = time.thread_time()
        update, result = execute_task(
            task,
            self._net(task.model_name),
            global_state,
            device.x,
            device.y,
            seed=device.seed * 100_003 + task.round,
            memory=device.memory,
        )
        # With one torch thread training runs on this thread: its CPU time is the work,
        # whatever else the host is doing; with more, only wall time says.
        host_s = time.thread_time() - cpu_start if torch.get_num_threads() == 1 else result.seconds
        data = encode(update, compress=task.compress, key=device.key)
        delay, compute_s = 0.0, 0.0
        if emulation is not None:
            cost = self._cost(task.model_name)
            compute_s = emulation.compute_seconds(host_s, cost, len(device.y), task.epochs)
            # msgpack floats are fixed-width: re-encoding keeps the size the time counts.
            update.usage.emulated_seconds = emulation.emulated_seconds(compute_s, len(data))
            data = encode(update, compress=task.compress, key=device.key)
            if emulation.realtime:
                delay = update.usage.emulated_seconds - result.seconds
        device.last_update = (task.round, task.model_fingerprint, data)
        publish = partial(device.connection.publish, self.topics.update(device.client_id), data, 1)
        if delay > 0:
            threading.Timer(delay, publish).start()
        else:
            publish()
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
                "train_seconds": result.seconds,
                "emulated_seconds": update.usage.emulated_seconds,
                "batch_size": task.batch_size,
                "profile": device.profile.profile_name,
            }
            | self._emulation_report(device, host_s, compute_s)
        )

    def _emulation_report(self, device: Device, host_s: float, compute_s: float) -> dict[str, Any]:
        """What the emulated time was made of, for checking it against the profile."""
        emulation = device.emulation
        if emulation is None:
            return {}
        return {
            "host_seconds": host_s,
            "compute_seconds": compute_s,
            "downlink_bytes": emulation.downlink_bytes,
            "host_gflops": emulation.host_gflops,
        }

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
