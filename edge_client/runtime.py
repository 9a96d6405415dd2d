"""Hosts one or many devices in one process: one MQTT loop, one training thread.

A real Raspberry Pi runs one device; fleet emulation runs hundreds per process.
Either way every device is its own MQTT connection and client id, all served by
one selector loop (``fedmpq.mqtt``), and all work that is more than queueing a
message runs on the single worker thread, in arrival order.

The runtime is the MQTT side of every device it hosts: subscriptions, status, registration,
updates and the report.  What a device does with a task is the device's business
(``edge_client.device``): the runtime drives a real and an emulated device alike.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from edge_client.device import Crashed, Device, Failed, Outcome, Refused, Trained
from edge_client.downlink_check import DownlinkCheck, RateLimitedLog
from edge_client.model_store import ModelStore, ModelStoreError
from edge_client.secure_task import Answer, SecureTask, answer_frame, dump_codes
from edge_client.session import AgentOptions, DeviceState, SentUpdate, Session
from edge_client.shared_models import GlobalModelCache, ModelPool
from fedmpq import __version__
from fedmpq.errors import DecodeError, FedmpqError, LayoutMismatchError
from fedmpq.mqtt import Connection, MqttLoop, Will
from fedmpq.topics import (
    CONTROL,
    MODEL,
    MODEL_AT,
    QOS,
    REGISTER,
    STATUS,
    TASK,
    UPDATE,
    publish_options,
)
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import (
    STATUS_CONNECTED,
    ControlMessage,
    ModelMessage,
    NoticeMessage,
    RegisterMessage,
    StatusMessage,
    TaskMessage,
)

log = logging.getLogger("fedmpq.agent")


class AgentRuntime:
    """Runs ``devices`` until stopped (or, with ``exit_when_done``, until the run ends)."""

    def __init__(self, devices: Sequence[Device], options: AgentOptions) -> None:
        self.devices = list(devices)
        self.options = options
        self.topics = options.topics
        self.inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self.stopped = threading.Event()
        self.models = GlobalModelCache()
        self.pool = ModelPool(options.num_classes, options.in_shape)
        self.sessions: dict[str, Session] = {}  # by client id, filled as devices connect
        self._report_lock = threading.Lock()
        self._stored_model = ""
        self.refusals = RateLimitedLog()

    # --- loop thread: queue and return ----------------------------------------------
    def _on_message(self, client_id: str, _conn: Connection, topic: str, payload: bytes) -> None:
        session = self.sessions[client_id]
        if topic == self.topics.status(client_id):
            # Answered here, not behind a training job: the coordinator must hear the
            # device's own word before it selects the next round.
            self._on_own_status(session, payload)
            return
        if topic == self.topics.task(client_id) and answer_frame(
            session.secure, session.check, client_id, payload, self.options.limits
        ):
            return
        self.inbox.put(partial(self._handle, session, topic, payload, time.monotonic()))

    def _on_connect(self, client_id: str, conn: Connection) -> None:
        # Its own status topic too: to answer a spoofed or replayed status about itself.
        for topic in (*self.topics.device_subscriptions(client_id), self.topics.status(client_id)):
            conn.subscribe(topic, qos=QOS)
        self.inbox.put(partial(self._announce, self.sessions[client_id]))

    def _will(self, client_id: str) -> Will:
        """The last will of the next connection attempt: offline, under a fresh nonce that
        the connection's statuses carry too (called on the loop thread before each attempt)."""
        session = self.sessions[client_id]
        session.connection_id = secrets.token_hex(8)
        frame = self._status_frame(session, "offline", 0, "connection lost")
        return (self.topics.status(client_id), frame, *publish_options(STATUS))

    def _publish_answer(self, session: Session, answer: Answer) -> None:
        device = session.device
        self._publish_update(session, encode(answer, key=device.key))

    # --- worker thread -----------------------------------------------------------------
    def _announce(self, session: Session) -> None:
        """On every (re)connect: the device is online over this connection."""
        session.sent_statuses.clear()  # statuses of earlier connections are theirs
        session.last_status = ("online", session.last_round, STATUS_CONNECTED)
        self._register(session)

    def _register(self, session: Session) -> None:
        """Register, then say the device's last status again: the registration opens the
        coordinator's record of the device, the status names the connection that is the
        device's own (a will of any other connection is then ignored)."""
        device = session.device
        msg = RegisterMessage(
            client_id=device.client_id,
            agent_version=__version__,
            profile=device.profile,
            num_samples=device.num_samples,
            accepts_zstd=True,
            sent_at=time.time(),
            data_fingerprint=device.data_fingerprint,
        )
        session.connection.publish(
            self.topics.register(device.client_id),
            encode(msg, key=device.key),
            *publish_options(REGISTER),
        )
        if session.last_status is not None:
            self._publish_status(session, *session.last_status)

    def _handle(self, session: Session, topic: str, payload: bytes, arrived: float) -> None:
        """A message on ``topic`` that ``arrived`` (monotonic clock) on the loop thread."""
        kind, _ = self.topics.parse(topic) or ("unknown", None)
        limits = self.options.limits
        # An empty retained payload is the broker clearing a model (nothing to trust).
        cleared = kind == MODEL_AT and not payload
        if not cleared and not session.check.admit(session.device.client_id, kind, payload, limits):
            return
        try:
            if kind == CONTROL:
                control = decode(payload, ControlMessage, limits)
                self._on_control(session, control, len(payload))
            elif kind == MODEL_AT:
                self._on_model_at(session, topic, payload)
            elif kind == TASK:
                session.device.task_arrived(len(payload))
                msg = decode(payload, None, limits)
                if isinstance(msg, NoticeMessage):
                    self._on_notice(session, msg)
                elif isinstance(msg, TaskMessage):
                    self._on_task(session, msg, arrived)
                else:
                    raise DecodeError(f"task topic: unexpected {type(msg).__name__}")
            elif kind == MODEL:
                self._on_model(session, decode(payload, ModelMessage, limits))
        except (DecodeError, ModelStoreError) as exc:
            log.warning("%s: rejected %s message: %s", session.device.client_id, kind, exc)

    def _wanted(self, run_id: str) -> bool:
        return not self.options.run_id or run_id == self.options.run_id

    def _on_control(self, session: Session, msg: ControlMessage, nbytes: int) -> None:
        if not self._wanted(msg.run_id):
            return
        if msg.state == "open":
            if msg.run_id != session.registered_run:
                session.registered_run = msg.run_id
                self._register(session)
            self._round_opened(session, msg.round, nbytes)
        elif (
            msg.state == "finished"
            and self.options.exit_when_done
            and msg.run_id == session.registered_run  # not a (retained) end of another run
        ):
            log.info("run %s finished", msg.run_id)
            self.stopped.set()

    def _on_own_status(self, session: Session, payload: bytes) -> None:
        """A status about this device that it did not send (a spoofed offline, a replayed
        or retained will of an earlier connection): while connected, its own word stands,
        so it says its last status again, newer than the one it answers."""
        last = session.last_status
        if last is None or payload in session.sent_statuses:
            return
        # Not decoded here on the loop thread: anyone may publish anything on this topic.
        # After a reconnect this is usually the retained will of the previous connection.
        log.info("%s: answering a status it did not send", session.device.client_id)
        self._publish_status(session, *last)

    def _round_opened(self, session: Session, round: int, nbytes: int) -> None:
        """Round ``round`` opened (an ``nbytes`` announcement): announce what the device
        says of its availability."""
        availability = session.device.round_opened(round, nbytes)
        if availability is None:
            return
        online = availability.online
        state: DeviceState = "online" if online else "offline"
        self._publish_status(session, state, availability.round, availability.detail)
        self._report(
            {"event": "availability", "client_id": session.device.client_id}
            | {"round": availability.round, "online": online}
        )

    def _on_model_at(self, session: Session, topic: str, payload: bytes) -> None:
        """A global model at an allocation arrived on this device's link (an empty payload
        is the coordinator clearing a closed round's model).  It is decoded against the
        layout of the model the waiting task names; one that no task waits for (the device
        subscribes only while one does) is reported with round None and not decoded."""
        task = session.pending
        if payload:
            round = None
            if task is not None:
                layout = self.pool.layout(task.model_name)
                try:
                    round = self.models.add(payload, self.options.limits, layout)
                except LayoutMismatchError as exc:  # (signed, if the run signs) not ours to train
                    self._give_up(session, task, exc)
                    task = None
            client_id = session.device.client_id
            report = {"event": "model", "client_id": client_id, "round": round}
            self._report(report | {"bytes": len(payload)})
        waiting = task is not None and self._model_of(task) is None
        if session.model_topic == topic and not waiting:
            session.connection.unsubscribe(topic)
            session.model_topic = None
        self._run_pending()

    def _give_up(self, session: Session, task: TaskMessage, exc: FedmpqError) -> None:
        """``task`` cannot run on this device: say so at once with an ``error`` status, so
        the round does not wait for it."""
        session.pending = None
        session.last_round = task.round
        self._publish_status(session, "error", task.round, f"{type(exc).__name__}: {exc}")
        self._report({"event": "error", "client_id": session.device.client_id, "round": task.round})

    def _model_of(self, task: TaskMessage) -> Mapping[str, Any] | None:
        return self.models.get(task.model_fingerprint, task.model_allocation)

    def _on_model(self, session: Session, msg: ModelMessage) -> None:
        """Verify and store the trained model (once per process: devices share the store)."""
        if self.options.model_dir is None or not self._wanted(msg.run_id):
            return
        if self._stored_model == msg.fingerprint:
            return
        stored = ModelStore(self.options.model_dir).save_message(msg)
        self._stored_model = msg.fingerprint
        client_id = session.device.client_id
        log.info("%s: stored model of run %s at %s", client_id, msg.run_id, stored.path)

    def _on_notice(self, session: Session, msg: NoticeMessage) -> None:
        """The coordinator left this device out of a round: log why, answer "rejected"."""
        client_id = session.device.client_id
        if not self._wanted(msg.run_id) or msg.client_id != client_id:
            return
        log.warning("%s: not selected for round %d: %s", client_id, msg.round, msg.reason)
        self._publish_status(session, "rejected", msg.round, msg.reason)

    def _on_task(self, session: Session, task: TaskMessage, arrived: float) -> None:
        client_id = session.device.client_id
        if not self._wanted(task.run_id) or task.client_id != client_id:
            return
        if session.secure is not None and session.secure.round == task.round:
            session.secure.advertise()  # asked again: the same keys (trained only once)
            return
        sent = session.last_update
        if sent is not None and sent.answers(task):
            self._answer_again(session, task, sent, arrived)
            return
        if task.round <= session.last_round:
            log.info("%s: ignoring task for old round %d", client_id, task.round)
            return
        if not session.device.online:
            log.info("%s: offline, task of round %d unseen", client_id, task.round)
            return
        try:  # the model arrives named by its layout's digest: one it cannot build fails now
            self.pool.layout(task.model_name)
        except FedmpqError as exc:
            self._give_up(session, task, exc)
            return
        if task.secagg is not None:
            session.secure = SecureTask(task, partial(self._publish_answer, session))
            session.secure.advertise()
        session.pending = task
        topic = self.topics.model_at(task.model_allocation)
        if self._model_of(task) is None and session.model_topic != topic:
            # Only a device with a task receives a model: the one at its allocation,
            # retained by the coordinator until the round closes.
            if session.model_topic is not None:
                session.connection.unsubscribe(session.model_topic)
            session.model_topic = topic
            session.connection.subscribe(topic, qos=QOS)
        self._run_pending()

    def _answer_again(
        self, session: Session, task: TaskMessage, sent: SentUpdate, arrived: float
    ) -> None:
        """The coordinator asks again for a round this device answered (the broker lost
        the update, or the coordinator restarted): the same update again, not retrained,
        which the coordinator aggregates at most once; a restarted coordinator gave the
        task a new token, which the update then echoes.  A task with the same token that
        arrived before the update went out (it waited behind the training) is answered by
        that update."""
        client_id = session.device.client_id
        if arrived < sent.sent_at and task.token == sent.update.token:
            log.info("%s: round %d already answered", client_id, task.round)
            return
        log.info("%s: re-sending update of round %d", client_id, task.round)
        update, frame = sent.update, sent.frame
        if update.token != task.token:
            update = replace(update, token=task.token)
            frame = encode(update, compress=task.compress, key=session.device.key)
        self._publish_update(session, frame)

    def _run_pending(self) -> None:
        for session in self.sessions.values():
            task = session.pending
            if task is not None and self._model_of(task) is not None:
                session.pending = None
                self._train(session, task)

    def _train(self, session: Session, task: TaskMessage) -> None:
        global_state = self._model_of(task)
        assert global_state is not None
        client_id = session.device.client_id
        session.last_round = task.round
        model_bytes = self.models.payload_bytes(task.model_fingerprint, task.model_allocation)
        session.device.task_arrived(model_bytes)
        outcome = self._run_task(session, task, global_state)
        if isinstance(outcome, Trained):
            self._send_update(session, task, outcome)
            return
        if isinstance(outcome, Crashed):
            self._publish_status(session, "offline", task.round, outcome.reason)
            event = "crash"
        elif isinstance(outcome, Failed):
            self._publish_status(session, "error", task.round, outcome.reason)
            event = "error"
        else:
            assert isinstance(outcome, Refused)
            self._publish_status(session, "rejected", task.round, outcome.reason)
            event = "rejected"
        self._report({"event": event, "client_id": client_id, "round": task.round})

    def _run_task(
        self, session: Session, task: TaskMessage, global_state: Mapping[str, np.ndarray]
    ) -> Outcome:
        """The device's outcome; a task that raises has failed, and the coordinator is told
        so the round does not wait for it until its deadline."""
        try:
            return session.device.run_task(task, global_state, self.pool)
        except Exception as exc:
            log.exception("%s: round %d failed", session.device.client_id, task.round)
            return Failed(f"{type(exc).__name__}: {exc}")

    def _send_update(self, session: Session, task: TaskMessage, trained: Trained) -> None:
        device = session.device
        publish: Callable[[], None]
        if trained.codes is not None and session.secure is not None:
            if self.options.secure_dump is not None:
                dump_codes(self.options.secure_dump, device.client_id, task, trained.codes)
            publish = partial(session.secure.trained, trained.codes)
        else:
            # A frame held back (emulated link time) goes out later: so does its sending time.
            sent_at = time.monotonic() + trained.delay
            session.last_update = SentUpdate(
                task.round, task.model_fingerprint, trained.update, trained.frame, sent_at
            )
            publish = partial(self._publish_update, session, trained.frame)
        if trained.delay > 0:
            threading.Timer(trained.delay, publish).start()
        else:
            publish()
        result = trained.result
        log.info(
            "%s: round %d trained in %.2f s (loss %.3f), sent %d bytes",
            device.client_id,
            task.round,
            result.seconds,
            result.loss,
            len(trained.frame),
        )
        self._report(
            {
                "event": "update",
                "client_id": device.client_id,
                "round": task.round,
                "bytes": len(trained.frame),
                "train_seconds": result.seconds,
                "emulated_seconds": trained.update.usage.emulated_seconds,
                "batch_size": trained.batch_size,
                "profile": device.profile.profile_name,
            }
            | trained.timing
        )

    def _report(self, row: dict[str, Any]) -> None:
        if self.options.report_path is None:
            return
        with self._report_lock, open(self.options.report_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    # --- publishing: every message a device sends goes out here ----------------------
    def _status_frame(self, session: Session, state: DeviceState, round: int, detail: str) -> bytes:
        device = session.device
        status = StatusMessage(
            device.client_id, state, round, detail, time.time(), session.connection_id
        )
        return encode(status, key=device.key)

    def _publish_status(
        self, session: Session, state: DeviceState, round: int, detail: str
    ) -> None:
        device = session.device
        frame = self._status_frame(session, state, round, detail)
        session.sent_statuses.append(frame)
        session.last_status = (state, round, detail)
        session.connection.publish(
            self.topics.status(device.client_id), frame, *publish_options(STATUS)
        )

    def _publish_update(self, session: Session, frame: bytes) -> None:
        topic = self.topics.update(session.device.client_id)
        session.connection.publish(topic, frame, *publish_options(UPDATE))

    # --- lifecycle ---------------------------------------------------------------------
    def _connection(self, loop: MqttLoop, device: Device) -> Connection:
        client_id = device.client_id
        return Connection(
            loop,
            self.options.broker,
            client_id,
            on_message=partial(self._on_message, client_id),
            on_connect=partial(self._on_connect, client_id),
            will=partial(self._will, client_id),
            protocol=self.options.protocol,
        )

    def run(self) -> None:
        """Connect every device and serve until stopped."""
        loop = MqttLoop()
        loop.start()
        try:
            for device in self.devices:
                check = DownlinkCheck(self.options.coordinator_key, self.refusals)
                session = Session(device, self._connection(loop, device), check)
                self.sessions[device.client_id] = session
                session.connection.connect()
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
            for session in self.sessions.values():
                # Round 0: gone until it connects again, not away for a round by its word.
                self._publish_status(session, "offline", 0, "stopped")
                session.connection.flush(5.0)
                session.connection.close()
            loop.stop()

    def stop(self) -> None:
        self.stopped.set()
