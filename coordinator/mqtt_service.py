"""The coordinator on a real broker: runs the round engine over MQTT.

Threads: the MQTT loop thread only queues incoming messages; the coordinator's own
thread decodes, validates and aggregates them (through the engine), so a slow decode
never stalls the network and every message is handled in arrival order.  Every message
the engine returns is published on its kind's topic with the QoS and retain flag of
``fedmpq.topics.publish_options``.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from coordinator.checkpoint import Checkpoint
from coordinator.config import RunConfig
from coordinator.engine import RoundEngine
from coordinator.events import DevicesReady, Outgoing, RoundTimed
from coordinator.outputs import (
    CheckpointStore,
    DirectoryCheckpoints,
    MetricsSink,
    ModelRelease,
    OnnxRelease,
    PlottedMetrics,
    run_title,
)
from coordinator.resume import restore, snapshot
from fedmpq.errors import FedmpqError
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop, Protocol
from fedmpq.topics import (
    CONTROL,
    MODEL,
    MODEL_AT,
    OWN_RETAINED_KINDS,
    QOS,
    TASK,
    Topics,
    publish_options,
)

log = logging.getLogger("fedmpq.coordinator")

MetricsFactory = Callable[[int | None], MetricsSink]


class MqttCoordinator:
    """Runs one federated training run as ``config`` describes, against ``broker``.

    ``engine``, ``checkpoints``, ``release`` and ``metrics`` default to the run's own
    (files in ``config.out_dir``); ``metrics(keep_through)`` opens the metrics sink, keeping
    the rows up to a resumed checkpoint's round.
    """

    def __init__(
        self,
        config: RunConfig,
        broker: BrokerAddress,
        *,
        protocol: Protocol = "5",
        on_round: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
        engine: RoundEngine | None = None,
        checkpoints: CheckpointStore | None = None,
        release: ModelRelease | None = None,
        metrics: MetricsFactory | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.protocol = protocol
        self.on_round = on_round
        self.resume = resume
        # Time spent connected and waiting on an empty inbox: the time in which a device
        # that came back would have been heard.  The offline grace runs on it, so time a
        # busy worker or a lost broker link kept a reconnect unheard does not count.
        self.listening_s = 0.0
        if engine is None:
            engine = RoundEngine(config, grace_clock=lambda: self.listening_s)
        self.engine = engine
        self.topics = Topics(config.topic_prefix)
        self.out_dir = Path(config.out_dir)
        self.checkpoints = checkpoints or DirectoryCheckpoints(self.out_dir)
        self.release = release or OnnxRelease(config, self.engine.workload)
        self.metrics = metrics or partial(PlottedMetrics, self.out_dir, title=run_title(config))
        # Work for the coordinator thread, in arrival order: messages and reconnect duties.
        self.inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        # What this coordinator last published on each retained topic it owns (newest
        # last): without MQTT 5's no-local option its own messages come back, late ones too.
        self._retained: dict[str, deque[bytes]] = {}
        self.conn: Connection | None = None
        self.idle_s = 0.0  # time spent waiting on the inbox, for RoundTimed

    # --- MQTT side (loop thread): queue and return -----------------------------------
    def _on_message(self, _conn: Connection, topic: str, payload: bytes) -> None:
        self.inbox.put(partial(self.handle, topic, payload))

    def _on_connect(self, conn: Connection) -> None:
        for topic in self.topics.coordinator_subscriptions:
            conn.subscribe(topic, qos=QOS)
        for topic in self.topics.coordinator_retained:
            conn.subscribe(topic, qos=QOS, no_local=True)
        # A broker restarted without persistence lost the retained announcement and
        # model and any task it had not delivered: send them again.
        self.inbox.put(lambda: self._send(self.engine.resend()))

    # --- coordinator thread ----------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """Hand a message that arrived on ``topic`` to the engine; publish its answer."""
        parsed = self.topics.parse(topic)
        if parsed is None:
            detail = f"message on unexpected topic {topic!r}"
            self.engine.rejections.reject("topic", None, detail)
            return
        kind, client_id = parsed
        if kind in OWN_RETAINED_KINDS:
            self._reassert(topic, payload)
            return
        self._send(self.engine.receive(kind, client_id, payload))

    def _reassert(self, topic: str, payload: bytes) -> None:
        """Someone else published on a retained topic of ours (a forged model or run
        announcement): devices refuse it unsigned, but as the retained message it would
        hide ours from every device that subscribes later, so publish ours again."""
        ours = self._retained.get(topic)
        if not ours or payload in ours or self.conn is None:
            return
        self.engine.rejections.reject("foreign", None, f"someone else published on {topic}")
        self.conn.publish(topic, ours[-1], QOS, True)

    def _send(self, messages: list[Outgoing]) -> None:
        conn = self.conn
        if conn is None:
            return
        for m in self.engine.signed(messages):
            topic, options = self._topic(m), publish_options(m.kind)
            if m.kind in OWN_RETAINED_KINDS:
                self._retained.setdefault(topic, deque(maxlen=4)).append(m.payload)
            conn.publish(topic, m.payload, *options)

    def _topic(self, m: Outgoing) -> str:
        t = self.topics
        if m.client_id is not None:
            return {TASK: t.task, MODEL_AT: t.model_at}[m.kind](m.client_id)
        return {CONTROL: t.control, MODEL: t.model}[m.kind]

    def _next_job(self, timeout: float) -> None:
        """Run the next inbox job, waiting at most ``timeout`` s for one."""
        started = time.perf_counter()
        listening = self._connected()
        try:
            job = self.inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            job = None
        waited = time.perf_counter() - started
        self.idle_s += waited
        if listening and self._connected():
            self.listening_s += waited
        if job is not None:
            job()

    def _connected(self) -> bool:
        return self.conn is not None and self.conn.connected.is_set()

    def _round_done(self) -> bool:
        """Whether the open round should close, once what had arrived is handled: an
        update or a reconnect queued behind a slow job still counts.  Only the backlog
        of this moment is handled, so a flood of messages cannot hold the round open."""
        engine = self.engine
        self._send(engine.tick())
        if not engine.done():
            return False
        for _ in range(self.inbox.qsize()):
            self._next_job(0.0)
        self._send(engine.tick())
        return engine.done()

    def _run_round(self, round: int) -> dict[str, Any]:
        engine = self.engine
        started, idle = time.perf_counter(), self.idle_s
        self._send(engine.open_round(round))
        while not self._round_done():
            self._next_job(min(engine.deadline() - engine.clock(), 1.0))
        row = engine.close_round()
        self._send(engine.withdraw_models())
        wall = time.perf_counter() - started
        engine.observers.emit(RoundTimed(round, wall, self.idle_s - idle))
        return row

    def _wait_for_devices(self, round: int, *, first: bool) -> None:
        """Before the ``first`` round this process runs (round 1, or the next one after
        ``--resume``), wait for ``min_clients`` devices, at most ``registration_timeout_s``.
        Later rounds go on with whoever is there (``quorum`` decides whether a round
        counts), and wait, however long, only while no device is there at all.  Devices
        that announced they are away (churn, crash) count: they come back by themselves."""
        cfg, engine = self.config, self.engine
        needed = cfg.min_clients if first else 1
        started = engine.clock()
        warned = started
        while len(engine.registry.accounted_for()) < needed:
            now = engine.clock()
            if first and now - started >= cfg.registration_timeout_s:
                online = len(engine.registry.accounted_for())
                raise FedmpqError(
                    f"only {online} of the {needed} devices the run needs registered within "
                    f"{cfg.registration_timeout_s:.0f} s; start more agents or lower min_clients"
                )
            if not first and now - warned >= cfg.registration_timeout_s:
                log.warning("round %d: no device connected; waiting for one", round)
                warned = now
            self._next_job(1.0)
        engine.observers.emit(DevicesReady(round, time.time()))

    def _rounds(self, metrics: MetricsSink, ckpt: Checkpoint | None) -> None:
        cfg, engine = self.config, self.engine
        cumulative = ckpt.cumulative_uplink_bytes if ckpt is not None else 0
        if ckpt is None:
            loss, accuracy = engine.evaluate()
            row0: dict[str, Any] = {"round": 0, "accuracy": accuracy, "loss": loss}
            self._emit(metrics, row0 | {"uplink_bytes": 0, "cumulative_uplink_bytes": 0})
        first = (ckpt.round if ckpt is not None else 0) + 1
        for r in range(first, cfg.rounds + 1):
            self._wait_for_devices(r, first=r == first)
            row = self._run_round(r)
            cumulative += row["uplink_bytes"]
            row["cumulative_uplink_bytes"] = cumulative
            # Metrics first: a crash between the two repeats the round on resume,
            # and resuming drops the logged rows past the checkpoint.
            self._emit(metrics, row)
            self.checkpoints.save(snapshot(engine, r, cumulative))

    def _finish(self, metrics: MetricsSink) -> None:
        """Release the model (retained, for devices that connect later), announce the end."""
        cfg, engine = self.config, self.engine
        payload = self.release.release(cfg.rounds, engine.global_state, engine.last_allocation)
        if payload is not None:
            self._send([Outgoing(MODEL, None, payload)])
        self._send([engine.control("finished", cfg.rounds)])
        metrics.close()

    def run(self) -> list[dict[str, Any]]:
        """Run every round and return the metrics rows (round 0 is the initial model)."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.checkpoints.load() if self.resume else None
        if ckpt is not None:
            restore(self.engine, ckpt)
        metrics = self.metrics(ckpt.round if ckpt is not None else None)
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
            self._rounds(metrics, ckpt)
            self._finish(metrics)
            conn.flush(10.0)
        finally:
            conn.close()
            loop.stop()
        return metrics.rows

    def _emit(self, metrics: MetricsSink, row: dict[str, Any]) -> None:
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
