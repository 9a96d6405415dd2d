"""The coordinator: registers devices, runs rounds over MQTT, aggregates, evaluates.

Threads: the MQTT loop thread only queues incoming messages; the coordinator's own
thread decodes, validates and aggregates them, so a slow decode never stalls the
network and every message is handled in arrival order.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from coordinator.aggregation import StreamingAverage, start_error, update_norm
from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.config import RunConfig
from coordinator.metrics import MetricsLog, plot_accuracy
from coordinator.registry import DeviceRecord, Registry
from fedmpq.budget import RoundDemand, budget_bits
from fedmpq.data.datasets import load_dataset
from fedmpq.errors import BudgetError, DecodeError, FedmpqError
from fedmpq.evaluation import evaluate
from fedmpq.fileio import write_atomic
from fedmpq.models import build_model, quantizable_layers
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.policies import (
    BitAllocation,
    ClientInfo,
    ClientResult,
    LayerInfo,
    PolicyContext,
    make_policy,
)
from fedmpq.quant_spec import QUANT_BITS
from fedmpq.resources import model_cost
from fedmpq.state import fingerprint, load_numpy_state, state_to_numpy
from fedmpq.topics import Topics
from fedmpq.wire.codec import (
    DecodeLimits,
    Envelope,
    decode_body,
    decode_envelope,
    encode,
    verify_envelope,
)
from fedmpq.wire.messages import (
    KIND_DELTA,
    STATUS_CONNECTED,
    ControlMessage,
    GlobalModelMessage,
    NoticeMessage,
    RegisterMessage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
)
from fedmpq.wire.signing import load_keyring
from fedmpq.wire.tensors import decode_state, encode_state

log = logging.getLogger("fedmpq.coordinator")

#: Test samples policies may evaluate modified global models on (FedLQ's sensitivity).
HELDOUT = 500


@dataclass
class RoundState:
    """What the coordinator tracks while one round is open."""

    round: int
    fingerprint: str
    selected: dict[str, BitAllocation]
    aggregate: StreamingAverage
    accepted: dict[str, ClientResult] = field(default_factory=dict)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    emulated_s: float = 0.0
    global_frame: bytes = b""  # what was published, for re-sending after a reconnect
    task_frames: dict[str, bytes] = field(default_factory=dict)
    started: float = 0.0
    excluded: dict[str, str] = field(default_factory=dict)  # client id -> why
    dropped: dict[str, str] = field(default_factory=dict)  # selected, gone mid-round -> why
    # Selected devices whose last will arrived -> when; gone for good after the grace.
    offline_since: dict[str, float] = field(default_factory=dict)
    offline_grace_s: float = 0.0
    quorum_target: int = 0  # answers needed for the round to change the model
    # (layer, bits) -> global weight minus its quantization at those bits (anchored policies)
    start_errors: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def complete(self) -> bool:
        now = time.monotonic()
        for client_id, since in list(self.offline_since.items()):
            if now - since >= self.offline_grace_s:
                del self.offline_since[client_id]
                self.dropped[client_id] = "offline"
        return len(self.accepted.keys() | self.dropped.keys()) == len(self.selected)


class Coordinator:
    """Runs one federated training run as ``config`` describes, against ``broker``."""

    def __init__(
        self,
        config: RunConfig,
        broker: BrokerAddress,
        *,
        protocol: str = "5",
        on_round: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
    ) -> None:
        self.config = config
        self.resume = resume
        self.broker = broker
        self.protocol = protocol
        self.on_round = on_round
        self.topics = Topics(config.topic_prefix)
        self.limits = DecodeLimits(max_message_bytes=config.max_message_bytes)
        self.out_dir = Path(config.out_dir)
        self.registry = Registry()
        self.rejected: Counter[str] = Counter()
        # Work for the coordinator thread, in arrival order: messages and reconnect duties.
        self.inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self.conn: Connection | None = None
        self._process = psutil.Process()
        self.rng = random.Random(config.seed)

        torch.manual_seed(config.seed)
        self.data = load_dataset(config.dataset)
        self.model = build_model(config.model, self.data.num_classes, self.data.in_shape)
        self.x_test, self.y_test = self.data.test.tensors()
        self.global_state = state_to_numpy(self.model)
        numels = {name: w.size for name, w in self.global_state.items()}
        self.layers = [LayerInfo(name, numels[name]) for name in quantizable_layers(self.model)]
        name, params = config.policy_params()
        self.policy = make_policy(name, **params)
        self.cost = model_cost(self.model, self.data.in_shape)
        # A small held-out sample for policies that measure sensitivity (FedLQ).
        self.x_heldout, self.y_heldout = self.x_test[:HELDOUT], self.y_test[:HELDOUT]
        context = PolicyContext(
            lambda: self.global_state,
            self._heldout_loss,
            config.scheme,
            config.per_channel,
            config.observer,
        )
        self.policy.setup(self.layers, context)
        self.round_state: RoundState | None = None
        self.device_keys = load_keyring(config.device_keys) if config.device_keys else None
        self.last_allocation: dict[str, BitAllocation] = {}

    # --- MQTT side (loop thread): queue and return -----------------------------------
    def _on_message(self, _conn: Connection, topic: str, payload: bytes) -> None:
        self.inbox.put(partial(self.handle, topic, payload))

    def _on_connect(self, conn: Connection) -> None:
        for topic in self.topics.coordinator_subscriptions:
            conn.subscribe(topic, qos=1)
        self.inbox.put(self._resend)

    def _resend(self) -> None:
        """After every (re)connect: announce the run again and re-send the open round.

        A broker restarted without persistence has lost the retained run announcement
        and global model, and any task it had not delivered; devices ignore a task for a
        round they already have, and an update sent twice is aggregated once.
        """
        conn = self.conn
        if conn is None:
            return
        rs = self.round_state
        self._control(conn, "open", rs.round if rs is not None else 0)
        if rs is None or not rs.global_frame:
            return
        conn.publish(self.topics.global_model, rs.global_frame, qos=1, retain=True)
        for client_id, task in rs.task_frames.items():
            if client_id not in rs.accepted:
                conn.publish(self.topics.task(client_id), task, qos=1)

    # --- message handling (coordinator thread) ---------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """Decode, validate and act on one message that arrived on ``topic``."""
        parsed = self.topics.parse(topic)
        if parsed is None:
            self._reject("topic", None, f"message on unexpected topic {topic!r}")
            return
        kind, client_id = parsed
        try:
            # Parsed once: the signature is checked on the envelope, then the body decoded.
            env = decode_envelope(payload, self.limits)
            if kind in ("register", "status", "update") and not self._authentic(client_id, env):
                return
            if kind == "register":
                msg = decode_body(env, RegisterMessage, self.limits)
                if msg.client_id != client_id:
                    self._reject("spoofed", client_id, f"registers as {msg.client_id!r}")
                    return
                self.registry.register(msg)
                log.info("registered %s (%d samples)", client_id, msg.num_samples)
            elif kind == "status":
                status = decode_body(env, StatusMessage, self.limits)
                if status.client_id == client_id:
                    online, announced = status.state != "offline", status.round > 0
                    self.registry.set_online(client_id, online, announced=announced)
                    self._drop_if_gone(status)
                    self._welcome_back(status)
            elif kind == "update":
                self._handle_update(client_id or "", env, len(payload))
        except DecodeError as exc:
            self._reject("malformed", client_id, str(exc))

    def _drop_if_gone(self, status: StatusMessage) -> None:
        """Stop waiting for a selected device that will not answer this round: it went
        offline (its last will, round 0, or a crash) or refused its task ("rejected").
        A status about a later round (a device announcing it will be away) does not
        count."""
        rs = self.round_state
        gone = status.state in ("offline", "rejected", "error")
        if rs is None or not gone or status.client_id not in rs.selected:
            return
        if status.round in (0, rs.round) and status.client_id not in rs.accepted:
            if status.state == "offline":
                # A will also fires when the broker itself restarts: give the device the
                # grace to reconnect before the round stops waiting for it.
                rs.offline_since.setdefault(status.client_id, time.monotonic())
                return
            rs.dropped[status.client_id] = f"{status.state}: {status.detail}"
            log.info("round %d: %s dropped out (%s)", rs.round, status.client_id, status.state)

    def _welcome_back(self, status: StatusMessage) -> None:
        """A selected device that (re)connected while its round is open gets its task again:
        the broker may have lost the task or the update.  The device answers a task it
        already answered with the same update, which is aggregated at most once."""
        rs = self.round_state
        if rs is None or status.state != "online" or self.conn is None:
            return
        rs.offline_since.pop(status.client_id, None)
        task = rs.task_frames.get(status.client_id)
        reconnected = status.detail == STATUS_CONNECTED
        if reconnected and task is not None and status.client_id not in rs.accepted:
            self.conn.publish(self.topics.task(status.client_id), task, qos=1)

    def _authentic(self, client_id: str | None, env: Envelope) -> bool:
        """With device keys configured, a device's frame must be signed with its own key."""
        if self.device_keys is None:
            return True
        key = self.device_keys.get(client_id or "")
        if key is None:
            self._reject("unknown_device", client_id, "no key enrolled for this device")
            return False
        if not verify_envelope(env, key):
            self._reject("bad_signature", client_id, "signature does not match the device key")
            return False
        return True

    def _reject(self, reason: str, client_id: str | None, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected %s message from %s: %s", reason, client_id, detail)

    def _handle_update(self, client_id: str, env: Envelope, frame_bytes: int) -> None:
        msg = decode_body(env, UpdateMessage, self.limits)
        rs = self.round_state
        problem = self._update_problem(msg, client_id, rs)
        if problem is not None:
            self._reject(*problem)
            return
        assert rs is not None
        tensors = decode_state(msg.tensors)
        shapes = {name: w.shape for name, w in tensors.items()}
        expected = {name: w.shape for name, w in self.global_state.items()}
        if shapes != expected:
            self._reject("shape", client_id, "tensor names or shapes differ from the model")
            return
        if self.policy.anchored:
            tensors = self._anchor(rs, client_id, tensors)
        bound = self.config.max_update_norm
        if bound > 0:
            norm = update_norm(tensors, self.global_state, msg.kind)
            if not norm <= bound:
                self._reject("norm", client_id, f"update norm {norm:.3g} exceeds {bound:.3g}")
                return
        rs.aggregate.add(tensors, float(msg.num_samples))
        sent_bits = {p.name: p.bits for p in msg.tensors if p.name in rs.selected[client_id].bits}
        rs.accepted[client_id] = ClientResult(
            client_id, msg.num_samples, sent_bits, dict(msg.bits_dropped), dict(msg.metrics)
        )
        rs.uplink_bytes += frame_bytes
        rs.emulated_s = max(rs.emulated_s, msg.usage.emulated_seconds)
        log.info("round %d: update from %s (%d bytes)", rs.round, client_id, frame_bytes)

    def _anchor(
        self, rs: RoundState, client_id: str, tensors: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Re-base a client's quantized layers on the global weights it started from (see
        ``coordinator.aggregation.start_error``)."""
        cfg = self.config
        for name, bits in rs.selected[client_id].bits.items():
            if bits not in QUANT_BITS:
                continue
            error = rs.start_errors.get((name, bits))
            if error is None:
                error = start_error(
                    self.global_state[name], bits, cfg.scheme, cfg.per_channel, cfg.observer
                )
                rs.start_errors[(name, bits)] = error
            tensors[name] = tensors[name] + error
        return tensors

    def _update_problem(
        self, msg: UpdateMessage, client_id: str, rs: RoundState | None
    ) -> tuple[str, str, str] | None:
        """Why an update cannot be aggregated (reason, client, detail), or None."""
        if msg.client_id != client_id:
            return "spoofed", client_id, f"update on {client_id}'s topic claims {msg.client_id!r}"
        if msg.run_id != self.config.run_id:
            return "wrong_run", client_id, f"run {msg.run_id!r}"
        if rs is None or msg.round != rs.round:
            return "stale", client_id, f"round {msg.round} is not open"
        if client_id not in rs.selected:
            return "unexpected", client_id, f"not selected for round {rs.round}"
        if client_id in rs.accepted:
            return "duplicate", client_id, f"already aggregated for round {rs.round}"
        if msg.model_fingerprint != rs.fingerprint:
            return "fingerprint", client_id, "trained from another global model"
        if msg.kind != self.policy.update_kind:
            return "kind", client_id, f"sent {msg.kind}, policy wants {self.policy.update_kind}"
        if msg.num_samples <= 0:
            return "samples", client_id, "num_samples must be positive"
        assigned = rs.selected[client_id].bits
        for p in msg.tensors:
            if p.name in assigned and p.bits > assigned[p.name]:
                return "bits", client_id, f"{p.name} at {p.bits} bits, assigned {assigned[p.name]}"
        return None

    def _drain(self, until: float, done: Callable[[], bool]) -> None:
        """Handle incoming messages until ``done()`` or the clock passes ``until``."""
        while not done():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                job = self.inbox.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            job()

    # --- rounds ----------------------------------------------------------------------
    def _control(self, conn: Connection, state: str, round: int, detail: str = "") -> None:
        msg = ControlMessage(self.config.run_id, state, round, detail, time.time())
        conn.publish(self.topics.control, encode(msg), qos=1, retain=True)

    def _evaluate(self) -> tuple[float, float]:
        load_numpy_state(self.model, self.global_state)
        result = evaluate(self.model, self.x_test, self.y_test)
        return result.loss, result.accuracy

    def _heldout_loss(self, state: dict[str, Any]) -> float:
        """Loss of ``state`` on the held-out sample (leaves ``self.model`` modified;
        ``_evaluate`` reloads the global model)."""
        load_numpy_state(self.model, state)
        return evaluate(self.model, self.x_heldout, self.y_heldout).loss

    def client_budget(self, device: DeviceRecord) -> float:
        """``device``'s average bit budget: set in the run config, else from its profile.

        Raises
        ------
        BudgetError
            When the device's profile cannot fit even 1-bit training.
        """
        cfg = self.config
        if device.client_id in cfg.client_budgets:
            return float(cfg.client_budgets[device.client_id])
        ids = sorted(self.registry.devices)
        if device.client_id in ids and ids.index(device.client_id) < len(cfg.budgets):
            return float(cfg.budgets[ids.index(device.client_id)])
        demand = RoundDemand(
            cfg.round_deadline_s, device.num_samples, cfg.training.epochs, cfg.training.batch_size
        )
        return budget_bits(device.profile, self.cost, demand)

    def begin_round(
        self, round: int, selected: list[DeviceRecord]
    ) -> tuple[bytes, dict[str, bytes]]:
        """Open ``round`` for ``selected``: allocate bits and encode what must be sent.

        Returns the encoded global model (for the retained global topic) and each
        client's encoded task.  Updates are then fed to :meth:`handle` until
        :meth:`round_complete` or the deadline, and :meth:`finish_round` closes it.
        A selected device whose profile cannot fit 1-bit training gets a
        ``NoticeMessage`` with the reason instead of a task.
        """
        cfg = self.config
        fp = fingerprint(self.global_state)
        admitted, clients, excluded = self._admit(round, selected)
        allocation = self.policy.allocate(round, clients)
        rs = RoundState(round, fp, allocation, StreamingAverage(self.global_state))
        rs.quorum_target = math.ceil(cfg.quorum * len(admitted))
        rs.offline_grace_s = cfg.offline_grace_s
        rs.started = time.monotonic()
        self.round_state = rs
        all_float = {name: 32 for name in self.global_state}
        rs.global_frame = encode(
            GlobalModelMessage(
                cfg.run_id, round, cfg.model, fp, encode_state(self.global_state, all_float)
            ),
            compress=cfg.compress,
        )
        return rs.global_frame, self._tasks(rs, admitted, excluded)

    def extend_round(self, devices: list[DeviceRecord]) -> dict[str, bytes]:
        """Add ``devices`` to the open round (replacing ones that did not answer); return
        their encoded tasks."""
        rs = self.round_state
        if rs is None:
            raise FedmpqError("extend_round() without an open round")
        admitted, clients, excluded = self._admit(rs.round, devices)
        allocation = self.policy.allocate(rs.round, clients)
        rs.selected.update(allocation)
        return self._tasks(rs, admitted, excluded)

    def _admit(
        self, round: int, devices: list[DeviceRecord]
    ) -> tuple[list[DeviceRecord], list[ClientInfo], dict[str, str]]:
        """Split ``devices`` into those that can train (with their budgets) and those whose
        profile cannot fit 1-bit training (with the reason)."""
        admitted, clients, excluded = [], [], {}
        for d in devices:
            try:
                budget = self.client_budget(d)
            except BudgetError as exc:
                excluded[d.client_id] = str(exc)
                log.warning("round %d: %s not selected: %s", round, d.client_id, exc)
                continue
            admitted.append(d)
            clients.append(ClientInfo(d.client_id, d.profile, d.num_samples, budget))
        return admitted, clients, excluded

    def _tasks(
        self, rs: RoundState, admitted: list[DeviceRecord], excluded: dict[str, str]
    ) -> dict[str, bytes]:
        """Encode the tasks of ``admitted`` (and notices for ``excluded``) and count them."""
        cfg = self.config
        tasks = {}
        for device in admitted:
            task = TaskMessage(
                run_id=cfg.run_id,
                round=rs.round,
                client_id=device.client_id,
                model_name=cfg.model,
                model_fingerprint=rs.fingerprint,
                policy=self.policy.name,
                bits=rs.selected[device.client_id].bits,
                scheme=cfg.scheme,
                per_channel=cfg.per_channel,
                epochs=cfg.training.epochs,
                batch_size=cfg.training.batch_size,
                learning_rate=cfg.training.learning_rate,
                deadline_s=cfg.round_deadline_s,
                compress=cfg.compress and device.accepts_zstd,
                options=self.policy.client_options(),
                observer=cfg.observer,
            )
            tasks[device.client_id] = encode(task, compress=cfg.compress and device.accepts_zstd)
        for client_id, reason in excluded.items():
            tasks[client_id] = encode(NoticeMessage(cfg.run_id, client_id, rs.round, reason))
        rs.excluded.update(excluded)
        rs.task_frames.update(tasks)
        # The broker fans the retained global model out to every selected device.
        rs.downlink_bytes += len(rs.global_frame) * len(admitted)
        rs.downlink_bytes += sum(len(t) for t in tasks.values())
        return tasks

    def round_complete(self) -> bool:
        """True once every selected client's update of the open round was aggregated."""
        return self.round_state is not None and self.round_state.complete()

    def finish_round(self) -> dict[str, Any]:
        """Close the open round: fold the accepted updates into the model, evaluate, log."""
        rs = self.round_state
        if rs is None:
            raise FedmpqError("finish_round() without an open round")
        self.round_state = None
        self.last_allocation = rs.selected
        collected = time.monotonic()
        selected = len(rs.selected)
        answered = len(rs.accepted)
        counted = answered > 0 and answered >= rs.quorum_target
        if counted:
            mean = rs.aggregate.mean()
            if self.policy.update_kind == KIND_DELTA:
                mean = {n: self.global_state[n] + d for n, d in mean.items()}
            self.global_state = mean
            self.policy.observe(rs.round, list(rs.accepted.values()))
        else:
            log.warning(
                "round %d: %d of %d answered, model unchanged", rs.round, answered, selected
            )
        loss, accuracy = self._evaluate()
        return {
            "round": rs.round,
            "accuracy": accuracy,
            "loss": loss,
            "selected": selected,
            "participants": sorted(rs.accepted),
            "counted": counted,
            "uplink_bytes": rs.uplink_bytes,
            "downlink_bytes": rs.downlink_bytes,
            "client_bits": {
                cid: round_bits(rs.selected[cid], self.layers) for cid in sorted(rs.selected)
            },
            "client_metrics": {cid: dict(r.metrics) for cid, r in sorted(rs.accepted.items())},
            "round_seconds": time.monotonic() - rs.started,
            # For soak tests: a leak shows as growth round over round.
            "coordinator_rss_bytes": self._process.memory_info().rss,
            "coordinator_open_fds": self._process.num_fds(),
            "collect_seconds": collected - rs.started,
            "emulated_seconds": rs.emulated_s,
            "rejected": dict(self.rejected),
            "excluded": dict(rs.excluded),
            "dropped": dict(rs.dropped),
        }

    def _run_round(self, conn: Connection, round: int, selected: list[DeviceRecord]) -> dict:
        glob, tasks = self.begin_round(round, selected)
        rs = self.round_state
        assert rs is not None
        conn.publish(self.topics.global_model, glob, qos=1, retain=True)
        for client_id, task in tasks.items():
            conn.publish(self.topics.task(client_id), task, qos=1)
        self._drain(rs.started + self.config.round_deadline_s, self.round_complete)
        spare = [d for d in self.registry.online() if d.client_id not in rs.task_frames]
        missing = rs.quorum_target - len(rs.accepted)
        if missing > 0 and spare:
            # Short of quorum at the deadline: retry once with devices not asked yet.
            spare.sort(key=lambda d: d.client_id)
            retry = self.rng.sample(spare, min(missing, len(spare)))
            log.warning(
                "round %d: %d short of quorum, asking %s",
                round,
                missing,
                [d.client_id for d in retry],
            )
            for client_id, task in self.extend_round(retry).items():
                conn.publish(self.topics.task(client_id), task, qos=1)
            self._drain(time.monotonic() + self.config.round_deadline_s, self.round_complete)
        return self.finish_round()

    def _wait_for_devices(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.registration_timeout_s
        # Devices that announced they are away (churn, crash) are not waited for.
        self._drain(deadline, lambda: len(self.registry.accounted_for()) >= cfg.min_clients)
        online = len(self.registry.accounted_for())
        if online < cfg.min_clients:
            raise FedmpqError(
                f"only {online} of the {cfg.min_clients} devices the run needs registered within "
                f"{cfg.registration_timeout_s:.0f} s; start more agents or lower min_clients"
            )

    def _checkpoint(self, round: int, cumulative_uplink: int) -> None:
        """Save the model (for export) and a resumable checkpoint, each atomically."""
        glob = GlobalModelMessage(
            self.config.run_id,
            round,
            self.config.model,
            fingerprint(self.global_state),
            encode_state(self.global_state, {}),
        )
        frame = encode(glob)
        write_atomic(self.out_dir / "global_model.msgpack", frame)
        ckpt = Checkpoint(
            run_id=self.config.run_id,
            round=round,
            global_frame=frame,
            policy_state=self.policy.state_dict(),
            devices=list(self.registry.devices.values()),
            rng_state=self.rng.getstate(),
            cumulative_uplink_bytes=cumulative_uplink,
            rejected=dict(self.rejected),
        )
        save_checkpoint(self.out_dir, ckpt)

    def _restore(self) -> Checkpoint:
        ckpt = load_checkpoint(self.out_dir)
        if ckpt.run_id != self.config.run_id:
            raise FedmpqError(
                f"{self.out_dir} holds a checkpoint of run {ckpt.run_id!r}, not "
                f"{self.config.run_id!r}; pass --run-id {ckpt.run_id}"
            )
        glob = ckpt.global_model()
        self.global_state = decode_state(glob.tensors)
        self.policy.load_state_dict(ckpt.policy_state)
        self.registry.devices = {d.client_id: d for d in ckpt.devices}
        self.rng.setstate(ckpt.rng_state)
        self.rejected = Counter(ckpt.rejected)
        log.info("resumed after round %d from model %s", ckpt.round, glob.fingerprint)
        return ckpt

    def _release_model(self, conn: Connection, round: int) -> None:
        """Write final_bits.json and publish the ONNX model, retained (model_release)."""
        from coordinator.model_release import release_model

        payload = release_model(
            self.config, self.model, self.global_state, self.last_allocation, self.data, round
        )
        if payload is not None:
            conn.publish(self.topics.model, payload, qos=1, retain=True)

    def run(self) -> list[dict[str, Any]]:
        """Run every round and return the metrics rows (round 0 is the initial model)."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self._restore() if self.resume else None
        done = ckpt.round if ckpt is not None else None
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", keep_through=done)
        loop = MqttLoop()
        loop.start()
        conn = Connection(
            loop,
            self.broker,
            f"coordinator-{cfg.run_id}"[:64],
            on_message=self._on_message,
            on_connect=self._on_connect,
            protocol=self.protocol,
            max_payload=cfg.max_message_bytes,
        )
        self.conn = conn
        try:
            conn.connect()
            if not conn.wait_connected(30.0):
                raise FedmpqError(
                    f"cannot connect to the broker at {self.broker.host}:{self.broker.port}"
                )
            cumulative = ckpt.cumulative_uplink_bytes if ckpt is not None else 0
            if ckpt is None:
                loss, accuracy = self._evaluate()
                row0: dict[str, Any] = {"round": 0, "accuracy": accuracy, "loss": loss}
                self._emit(metrics, row0 | {"uplink_bytes": 0, "cumulative_uplink_bytes": 0})
            for r in range((done or 0) + 1, cfg.rounds + 1):
                self._wait_for_devices()  # e.g. the fleet is reconnecting after a broker restart
                selected = self.registry.select(cfg.clients_per_round, self.rng)
                row = self._run_round(conn, r, selected)
                cumulative += row["uplink_bytes"]
                row["cumulative_uplink_bytes"] = cumulative
                # Metrics first: a crash between the two repeats the round on resume,
                # and resuming drops the logged rows past the checkpoint.
                self._emit(metrics, row)
                self._checkpoint(r, cumulative)
            self._release_model(conn, cfg.rounds)
            self._control(conn, "finished", cfg.rounds)
            plot_accuracy(metrics.rows, self.out_dir / "accuracy.png", title=self._title())
            conn.flush(10.0)
        finally:
            conn.close()
            loop.stop()
        return metrics.rows

    def _emit(self, metrics: MetricsLog, row: dict[str, Any]) -> None:
        metrics.append(row)
        log.info(
            "round %d: accuracy %.4f loss %.4f uplink %d B",
            row["round"],
            row["accuracy"],
            row["loss"],
            row.get("uplink_bytes", 0),
        )
        if self.on_round is not None:
            self.on_round(row)

    def _title(self) -> str:
        name, params = self.config.policy_params()
        detail = ",".join(f"{k}={v}" for k, v in params.items())
        return f"{self.config.model} on {self.config.dataset}, policy {name}({detail})"


def round_bits(allocation: BitAllocation, layers: list[LayerInfo]) -> float:
    """Parameter-weighted average bits of an allocation, rounded for the log."""
    return round(allocation.average_bits(layers), 3)
