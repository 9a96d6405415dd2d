"""Liveness on a real mosquitto with real processes: wills that are spoofed or replayed,
an agent killed for good, a resumed coordinator with no device connected, a training that
fails.  Attacks are published from outside, as anyone with access to the broker could."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from test_reliability import DEADLINE_S, _agent, _coordinator, _finish, _wait_for_round

from coordinator.metrics import read_metrics
from coordinator.model_release import FINAL_BITS, read_final_bits
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
from fedmpq.topics import Topics
from fedmpq.wire.codec import decode, encode
from fedmpq.wire.messages import ControlMessage, StatusMessage

TOPICS = Topics()
DEVICES = ["device-0000", "device-0001", "device-0002"]


class BrokerWatch:
    """Every status and control frame on the broker, as an outsider subscribed to
    ``status/+`` and ``control`` sees them; it publishes what an attacker would."""

    def __init__(self, loop: MqttLoop, url: str) -> None:
        self.frames: dict[str, list[bytes]] = defaultdict(list)  # by client id; "" = control
        self.changed = threading.Condition()
        self.conn = Connection(
            loop, BrokerAddress.parse(url), "test-outsider", on_message=self._on_message
        )
        self.conn.subscribe(TOPICS.coordinator_subscriptions[1])  # status/+
        self.conn.subscribe(TOPICS.control)
        self.conn.connect()
        assert self.conn.wait_connected(30.0)

    def _on_message(self, _conn: Connection, topic: str, payload: bytes) -> None:
        key = "" if topic == TOPICS.control else topic.rsplit("/", 1)[1]
        with self.changed:
            self.frames[key].append(payload)
            self.changed.notify_all()

    def wait_for(self, key: str, cls: type, match: Callable[..., bool]) -> bytes:
        """The newest frame of ``cls`` under ``key`` that ``match`` accepts, once there is one."""
        deadline = time.monotonic() + DEADLINE_S
        with self.changed:
            while True:
                for frame in reversed(self.frames[key]):
                    if match(decode(frame, cls)):
                        return frame
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no matching {cls.__name__} for {key!r}"
                self.changed.wait(remaining)

    def publish_status(self, client_id: str, frame: bytes) -> None:
        self.conn.publish(TOPICS.status(client_id), frame, qos=1, retain=True)
        assert self.conn.flush(30.0)


@contextmanager
def watching(url: str) -> Iterator[BrokerWatch]:
    with MqttLoop() as loop:
        yield BrokerWatch(loop, url)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def _rows(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def test_spoofed_and_replayed_wills_neither_end_the_run_nor_exclude_a_device(mosquitto, tmp_path):
    url, run_id = mosquitto.url, "wills-it"
    procs = []
    with watching(url) as watch:
        try:
            # A real will of an earlier connection of device-0000, captured on the broker.
            first = _agent(url, run_id, tmp_path, 0, 3)
            procs.append(first)
            online = decode(
                watch.wait_for("device-0000", StatusMessage, lambda s: s.state == "online"),
                StatusMessage,
            )
            os.kill(first.pid, signal.SIGKILL)
            old_will = watch.wait_for(
                "device-0000",
                StatusMessage,
                lambda s: s.state == "offline" and s.connection == online.connection,
            )
            agents = [_agent(url, run_id, tmp_path, i, 3) for i in range(3)]
            procs += agents
            coordinator = _coordinator(url, run_id, tmp_path, 5, "--min-clients", "3")
            procs.append(coordinator)
            _wait_for_round(url, run_id, 1, coordinator)
            watch.publish_status("device-0000", old_will)  # replayed
            # The will's exact content as it was before connections had nonces.
            spoof = StatusMessage("device-0001", "offline", 0, "connection lost", 0.0)
            watch.publish_status("device-0001", encode(spoof))
            _wait_for_round(url, run_id, 2, coordinator)
            # The nonce of device-0002's connection, read from its retained status.
            current = decode(
                watch.wait_for("device-0002", StatusMessage, lambda s: s.connection != ""),
                StatusMessage,
            )
            forged = dataclasses.replace(current, state="offline", round=0, sent_at=0.0)
            watch.publish_status("device-0002", encode(forged))
            _finish([coordinator, *agents])
        finally:
            _stop(procs)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert all(r["counted"] and r["dropped"] == {} for r in rows[1:])
    # The replayed and the spoofed will change nothing; the forged one with the live nonce
    # can cost device-0002 at most the round after it, until the device's answer is heard.
    assert all(r["participants"] == DEVICES for r in rows[1:] if r["round"] != 4)
    assert set(rows[4]["participants"]) >= {"device-0000", "device-0001"}
    log = (tmp_path / "coordinator2.log").read_text()
    assert "ignored offline status of device-0000" in log
    assert "ignored offline status of device-0001" in log


def test_an_agent_killed_for_good_costs_at_most_its_round(mosquitto, tmp_path):
    url, run_id = mosquitto.url, "kill-it"
    agents = [_agent(url, run_id, tmp_path, i, 3) for i in range(3)]
    coordinator = _coordinator(url, run_id, tmp_path, 4, "--min-clients", "3")
    try:
        _wait_for_round(url, run_id, 1, coordinator)  # round 2 is open: its tasks are out
        os.kill(agents[2].pid, signal.SIGKILL)
        _finish([coordinator, *agents[:2]])
    finally:
        _stop([coordinator, *agents])
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["participants"] == DEVICES
    assert set(rows[2]["participants"]) >= set(DEVICES[:2])
    assert all(r["participants"] == DEVICES[:2] and r["counted"] for r in rows[3:])


def test_resume_with_no_device_connected_waits_for_them(mosquitto, tmp_path):
    url, run_id = mosquitto.url, "resume-wait-it"
    agents = [_agent(url, run_id, tmp_path, i, 2) for i in range(2)]
    first = _coordinator(url, run_id, tmp_path, 4)
    procs = [first, *agents]
    with watching(url) as watch:
        try:
            _wait_for_round(url, run_id, 2, first)
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            for agent in agents:
                agent.send_signal(signal.SIGTERM)
                assert agent.wait(timeout=DEADLINE_S) == 0
            stopped = time.time()
            resumed = _coordinator(url, run_id, tmp_path, 4, "--resume")
            procs.append(resumed)
            # The resumed coordinator has announced the run: it is waiting for devices.
            watch.wait_for("", ControlMessage, lambda c: c.sent_at > stopped)
            assert resumed.poll() is None
            agents = [_agent(url, run_id, tmp_path, i, 2) for i in range(2)]
            procs += agents
            _finish([resumed, *agents])
        finally:
            _stop(procs)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["participants"] == DEVICES[:2] for r in rows[1:])
    assert read_final_bits(tmp_path)["bits"], f"{FINAL_BITS} holds no bits"
    assert (tmp_path / "model.onnx").stat().st_size > 0


BAD_DATA = '''
import dataclasses
from fedmpq.data.datasets import load_dataset


def eleven_classes():
    """The shipped data, declared with one class more than the run's model has."""
    return dataclasses.replace(load_dataset(), num_classes=11)
'''


def test_a_failing_training_reports_error_and_the_round_does_not_wait(mosquitto, tmp_path):
    url, run_id = mosquitto.url, "error-it"
    (tmp_path / "bad_data.py").write_text(BAD_DATA)
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    good = _agent(url, run_id, tmp_path, 0, 2)
    bad = _agent(url, run_id, tmp_path, 1, 2, "--data", "module:bad_data:eleven_classes", env=env)
    # A deadline the round would only reach by waiting for the failed device.
    coordinator = _coordinator(url, run_id, tmp_path, 1, "--round-deadline", "3600")
    try:
        _finish([coordinator, good, bad])
    finally:
        _stop([coordinator, good, bad])
    (row,) = _rows(tmp_path)[1:]
    assert row["participants"] == ["device-0000"]
    # Its data has 11 classes: the model it builds is not the run's, whose frame it refuses.
    assert row["dropped"]["device-0001"].startswith("error: LayoutMismatchError")
    assert row["round_seconds"] < 3600
    events = [json.loads(line) for line in (tmp_path / "agents.jsonl").read_text().splitlines()]
    assert {"event": "error", "client_id": "device-0001", "round": 1} in events
