"""fedmpq.mqtt against a real mosquitto: delivery, retained messages, last will,
reconnects, size limits, and 600 connections on one loop past fd 1024."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import fedmpq
from fedmpq.broker import MosquittoBroker
from fedmpq.errors import PayloadTooLargeError, TransportError
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop, publish_packet_size
from fedmpq.topics import STATUS_OFFLINE, STATUS_ONLINE, Topics

TIMEOUT = 15.0


class Inbox:
    """An on_message handler that records messages and lets the test wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, conn: Connection, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def wait_for(
        self, count: int = 1, topic: str | None = None, timeout: float = TIMEOUT
    ) -> list[tuple[str, bytes]]:
        """The first ``count`` messages (on ``topic``, if given); fails the test on timeout."""

        def matching() -> list[tuple[str, bytes]]:
            return [m for m in self.messages if topic is None or m[0] == topic]

        with self._cond:
            arrived = self._cond.wait_for(lambda: len(matching()) >= count, timeout)
            assert arrived, f"expected {count} messages on {topic}, got {matching()}"
            return matching()[:count]


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    poll = threading.Event()
    while not condition():
        if time.monotonic() >= deadline:
            return False
        poll.wait(0.01)
    return True


def connect(
    loop: MqttLoop,
    broker: BrokerAddress,
    client_id: str,
    subscriptions: tuple[str, ...] = (),
    **kwargs: object,
) -> tuple[Connection, Inbox]:
    inbox = Inbox()
    conn = Connection(loop, broker, client_id, on_message=inbox, **kwargs)  # type: ignore[arg-type]
    for topic in subscriptions:
        conn.subscribe(topic)
    conn.connect()
    assert conn.wait_connected(TIMEOUT), f"{client_id} did not connect to {broker.url}"
    return conn, inbox


class CuttableProxy:
    """A TCP forwarder to the broker whose live connections the test can cut, like a
    flaky link: the broker sees the socket close without DISCONNECT."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = BrokerAddress("127.0.0.1", self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv()
            sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self.cut()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


# -- delivery -----------------------------------------------------------------------


def test_two_connections_exchange_qos1_messages_in_order(
    mosquitto: MosquittoBroker, mqtt_loop: MqttLoop
) -> None:
    a, inbox_a = connect(mqtt_loop, mosquitto.address, "a", ("t/a",))
    b, inbox_b = connect(mqtt_loop, mosquitto.address, "b", ("t/b",))

    for i in range(20):
        a.publish("t/b", f"a{i}".encode())
    b.publish("t/a", b"\x00\xffbinary")

    assert inbox_b.wait_for(20) == [("t/b", f"a{i}".encode()) for i in range(20)]
    assert inbox_a.wait_for(1) == [("t/a", b"\x00\xffbinary")]
    assert len(inbox_a.messages) == 1  # no echo of a's own traffic


def test_publish_from_many_threads(mosquitto: MosquittoBroker, mqtt_loop: MqttLoop) -> None:
    _, inbox = connect(mqtt_loop, mosquitto.address, "sink", ("m/#",))
    source, _ = connect(mqtt_loop, mosquitto.address, "source")

    def send(worker: int) -> None:
        for i in range(25):
            source.publish(f"m/{worker}", str(i).encode())

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    inbox.wait_for(200)
    for worker in range(8):  # per-thread order survives the hand-off to the loop
        got = [p for t, p in inbox.messages if t == f"m/{worker}"]
        assert got == [str(i).encode() for i in range(25)]


def test_retained_message_reaches_late_subscriber(
    mosquitto: MosquittoBroker, mqtt_loop: MqttLoop
) -> None:
    model = Topics().model_at("0123abcd0123abcd")
    coordinator, own = connect(mqtt_loop, mosquitto.address, "coord", (model,))
    coordinator.publish(model, b"model-r3", retain=True)
    own.wait_for(1)  # the broker has stored it once it echoes it back

    _, late = connect(mqtt_loop, mosquitto.address, "late", (model,))
    assert late.wait_for(1) == [(model, b"model-r3")]


def test_unsubscribed_and_cleared_models_are_not_delivered(
    mosquitto: MosquittoBroker, mqtt_loop: MqttLoop
) -> None:
    topics = Topics()
    model, done = topics.model_at("0123abcd0123abcd"), topics.update("dev")
    coordinator, own = connect(mqtt_loop, mosquitto.address, "coord", (model, done))
    coordinator.publish(model, b"model-r3", retain=True)
    own.wait_for(1, topic=model)
    device, got = connect(mqtt_loop, mosquitto.address, "dev", (model, topics.control))
    assert got.wait_for(1) == [(model, b"model-r3")]
    device.unsubscribe(model)
    device.publish(done, b"trained")  # after the UNSUBSCRIBE on the same connection
    own.wait_for(1, topic=done)
    coordinator.publish(model, b"model-r4", retain=True)  # a round the device is not in
    coordinator.publish(model, b"", retain=True)  # the round closes: cleared
    coordinator.publish(topics.control, b"round 5")
    assert got.wait_for(2) == [(model, b"model-r3"), (topics.control, b"round 5")]
    _, late = connect(mqtt_loop, mosquitto.address, "late", (model, topics.control))
    coordinator.publish(topics.control, b"round 6")  # after late's retained deliveries
    assert late.wait_for(1) == [(topics.control, b"round 6")]


def test_exception_in_callback_does_not_kill_the_loop(
    mosquitto: MosquittoBroker, mqtt_loop: MqttLoop
) -> None:
    inbox = Inbox()

    def fragile(conn: Connection, topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        inbox(conn, topic, payload)

    sink = Connection(mqtt_loop, mosquitto.address, "fragile", on_message=fragile)
    sink.subscribe("f")
    sink.connect()
    assert sink.wait_connected(TIMEOUT)
    source, _ = connect(mqtt_loop, mosquitto.address, "source")
    mqtt_loop.call_soon(lambda: 1 / 0)  # a broken hand-off must not kill it either

    source.publish("f", b"boom")
    source.publish("f", b"after")
    assert inbox.wait_for(1) == [("f", b"after")]
    assert sink.connected.is_set()


# -- last will ----------------------------------------------------------------------

_DOOMED_DEVICE = """
import sys, threading
from fedmpq.mqtt import BrokerAddress, Connection, MqttLoop
url, topic = sys.argv[1], sys.argv[2]
loop = MqttLoop()
loop.start()
conn = Connection(loop, BrokerAddress.parse(url), "doomed", on_message=lambda *a: None,
                  will=(topic, b"offline", 1, True))
conn.connect()
if not conn.wait_connected(10):
    sys.exit("no connection")
conn.publish(topic, b"online", retain=True)
threading.Event().wait()
"""


def test_last_will_published_when_device_is_killed(
    mosquitto: MosquittoBroker, mqtt_loop: MqttLoop
) -> None:
    status = Topics().status("doomed")
    _, inbox = connect(mqtt_loop, mosquitto.address, "observer", (status,))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(fedmpq.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    device = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_DEVICE, mosquitto.url, status],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert inbox.wait_for(1) == [(status, STATUS_ONLINE)]
        device.send_signal(signal.SIGKILL)  # no DISCONNECT, socket closed by the kernel
        assert inbox.wait_for(2)[1] == (status, STATUS_OFFLINE)
    finally:
        device.kill()
        device.wait()


def test_clean_close_sends_no_will(mosquitto: MosquittoBroker, mqtt_loop: MqttLoop) -> None:
    status = Topics().status("polite")
    _, inbox = connect(mqtt_loop, mosquitto.address, "observer", (status, "marker"))
    polite, _ = connect(
        mqtt_loop, mosquitto.address, "polite", will=(status, STATUS_OFFLINE, 1, True)
    )
    polite.close()
    with pytest.raises(TransportError):
        polite.publish(status, b"too late")

    marker, _ = connect(mqtt_loop, mosquitto.address, "marker")
    marker.publish("marker", b"done")
    inbox.wait_for(1, topic="marker")
    assert (status, STATUS_OFFLINE) not in inbox.messages


# -- reconnect ----------------------------------------------------------------------


def test_reconnects_after_broker_restart(mosquitto: MosquittoBroker, mqtt_loop: MqttLoop) -> None:
    a, inbox = connect(mqtt_loop, mosquitto.address, "a", ("r/a",))
    b, _ = connect(mqtt_loop, mosquitto.address, "b")
    b.publish("r/a", b"before")
    inbox.wait_for(1)

    mosquitto.stop()
    assert wait_until(lambda: not a.connected.is_set() and not b.connected.is_set())
    mosquitto.start()  # same port, no persistence: every session is gone

    assert a.wait_connected(TIMEOUT) and b.wait_connected(TIMEOUT)
    b.publish("r/a", b"after")  # reaches a only if a restored its subscription
    assert inbox.wait_for(2) == [("r/a", b"before"), ("r/a", b"after")]


def test_session_survives_a_dropped_link(mosquitto: MosquittoBroker, mqtt_loop: MqttLoop) -> None:
    proxy = CuttableProxy(mosquitto.port)
    try:
        a, inbox_a = connect(mqtt_loop, proxy.address, "a", ("s/a",))
        b, inbox_b = connect(mqtt_loop, mosquitto.address, "b", ("s/b",))

        proxy.cut()
        assert wait_until(lambda: not a.connected.is_set())
        b.publish("s/a", b"sent while a was away")  # the broker queues it in a's session
        a.publish("s/b", b"queued while offline")  # a holds it until it reconnects

        assert inbox_a.wait_for(1) == [("s/a", b"sent while a was away")]
        assert inbox_b.wait_for(1) == [("s/b", b"queued while offline")]
        assert a.connected.is_set()
    finally:
        proxy.close()


def test_connect_retries_until_the_broker_appears(
    mosquitto: MosquittoBroker, mqtt_loop: MqttLoop
) -> None:
    mosquitto.stop()  # keeps its port for the restart
    conn = Connection(mqtt_loop, mosquitto.address, "early", on_message=Inbox())
    conn.connect()
    assert not conn.wait_connected(0.3)
    mosquitto.start()
    assert conn.wait_connected(TIMEOUT)


# -- size limits --------------------------------------------------------------------


def test_configured_max_payload(mosquitto: MosquittoBroker, mqtt_loop: MqttLoop) -> None:
    _, inbox = connect(mqtt_loop, mosquitto.address, "sink", ("big",))
    source, _ = connect(mqtt_loop, mosquitto.address, "source", max_payload=1000)

    with pytest.raises(PayloadTooLargeError, match=r"1001 bytes .* limit of 1000 bytes"):
        source.publish("big", b"x" * 1001)
    source.publish("big", b"x" * 1000)
    assert inbox.wait_for(1) == [("big", b"x" * 1000)]


def test_broker_max_packet_size_from_connack(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_loop: MqttLoop
) -> None:
    broker = mosquitto_factory(["max_packet_size 10000"])
    _, inbox = connect(mqtt_loop, broker.address, "sink", ("p",))
    source, _ = connect(mqtt_loop, broker.address, "source")
    assert source.broker_max_packet_size == 10000

    # Packet size = fixed header (1 + 2-byte remaining length) + topic (2 + 1) + packet id
    # (2) + properties length (1) + payload: the largest payload that fits is 9991 bytes.
    fits = 10000 - 9
    assert publish_packet_size("p", fits, 1) == 10000
    with pytest.raises(PayloadTooLargeError, match=r"10001-byte PUBLISH packet.*10000-byte"):
        source.publish("p", b"y" * (fits + 1))
    source.publish("p", b"y" * fits)  # mosquitto accepts exactly its limit
    assert inbox.wait_for(1) == [("p", b"y" * fits)]
    assert source.connected.is_set()


# -- many connections ---------------------------------------------------------------


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} file descriptors needed")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _sockets_above(fd_floor: int) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if int(name) >= fd_floor and os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count sockets")
def test_600_connections_on_one_loop_past_fd_1024(
    mosquitto: MosquittoBroker, mqtt_loop: MqttLoop
) -> None:
    n = 600
    _raise_fd_limit(1024 + n + 256)
    threads_before = threading.active_count()
    # Occupy the low descriptors so every MQTT socket lands above 1024, where select()
    # (paho's own loop) cannot go.
    padding = [os.open(os.devnull, os.O_RDONLY) for _ in range(1024)]
    try:
        topics = Topics("many")
        inbox = Inbox()
        devices = [
            Connection(mqtt_loop, mosquitto.address, f"dev-{i}", on_message=inbox) for i in range(n)
        ]
        for device in devices:
            device.subscribe(topics.task(device.client_id))
            device.connect()
        deadline = time.monotonic() + 60
        for device in devices:
            assert device.wait_connected(max(0.0, deadline - time.monotonic())), device.client_id
        assert _sockets_above(1024) >= n
        assert threading.active_count() <= threads_before + 8  # one loop, a few workers

        coordinator, _ = connect(mqtt_loop, mosquitto.address, "coordinator")
        for device in devices:
            coordinator.publish(topics.task(device.client_id), device.client_id.encode())
        got = inbox.wait_for(n, timeout=60)
        assert sorted(got) == sorted(
            (topics.task(d.client_id), d.client_id.encode()) for d in devices
        )
    finally:
        for fd in padding:
            os.close(fd)
