"""Smoke test of the demo's embedded amqtt broker with MQTT 3.1.1 connections."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from fedmpq.mqtt import Connection, MqttLoop

pytest.importorskip("amqtt", reason="the embedded broker needs the demo extra (amqtt)")

from fedmpq.broker import EmbeddedBroker

TIMEOUT = 15.0


def test_embedded_broker_carries_a_2mb_message(mqtt_loop: MqttLoop) -> None:
    payload = bytes(range(256)) * (2 * 1024 * 1024 // 256)
    received: list[tuple[str, bytes]] = []
    arrived = threading.Event()

    def on_message(conn: Connection, topic: str, data: bytes) -> None:
        received.append((topic, data))
        arrived.set()

    with EmbeddedBroker() as broker:
        port = broker.port
        assert broker.url == f"mqtt://127.0.0.1:{port}"
        sink = Connection(
            mqtt_loop, broker.address, "sink", on_message=on_message, protocol="3.1.1"
        )
        sink.subscribe("fedmpq/global")
        source = Connection(
            mqtt_loop, broker.address, "source", on_message=on_message, protocol="3.1.1"
        )
        sink.connect()
        source.connect()
        assert sink.wait_connected(TIMEOUT) and source.wait_connected(TIMEOUT)

        source.publish("fedmpq/global", payload)
        assert arrived.wait(TIMEOUT)
        assert received == [("fedmpq/global", payload)]
        sink.close()
        source.close()

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
        pass  # stopped: nothing listens any more


def test_embedded_broker_serves_devices_that_connect_together(
    mqtt_loop: MqttLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """A connecting device makes amqtt walk every subscription and await the retained
    messages that match; devices subscribing meanwhile (a fleet starting) made it raise
    "dictionary changed size during iteration", an unhandled error in the broker's
    handling of the connecting device (which was dropped and reconnected). Every device
    must get its message through, and that error must not occur."""
    devices = [f"dev-{i}" for i in range(180)]
    arrived: set[str] = set()

    all_arrived = threading.Event()

    def on_register(conn: Connection, topic: str, data: bytes) -> None:
        arrived.add(topic.rsplit("/", 1)[1])
        if arrived.issuperset(devices):
            all_arrived.set()

    def ignore(conn: Connection, topic: str, data: bytes) -> None:
        pass

    with EmbeddedBroker() as broker:
        source = Connection(
            mqtt_loop, broker.address, "source", on_message=ignore, protocol="3.1.1"
        )
        source.connect()
        assert source.wait_connected(TIMEOUT)
        for i in range(30):
            source.publish(f"fedmpq/status/other-{i}", b"online", retain=True)
        conns = [source]
        for client_id in devices:
            conn = Connection(
                mqtt_loop,
                broker.address,
                client_id,
                on_message=ignore,
                protocol="3.1.1",
            )
            for topic in ("fedmpq/status/+", *(f"fedmpq/task/{client_id}-{n}" for n in range(20))):
                conn.subscribe(topic)
            conn.publish(f"fedmpq/register/{client_id}", b"hello", retain=True)
            conn.connect()
            conns.append(conn)
        sink = Connection(
            mqtt_loop, broker.address, "sink", on_message=on_register, protocol="3.1.1"
        )
        sink.subscribe("fedmpq/register/+")
        sink.connect()
        conns.append(sink)
        assert all_arrived.wait(TIMEOUT), f"never served: {sorted(set(devices) - arrived)}"
        # Only this failure: on a loaded machine amqtt may also time out waiting for PUBACKs,
        # which says nothing about the fix.
        crashes = [r for r in caplog.records if "changed size during iteration" in _text(r)]
        assert crashes == []
        for conn in conns:
            conn.close()


def _text(record: logging.LogRecord) -> str:
    """A log record's message with its exception, where the error text is."""
    exc = record.exc_info[1] if record.exc_info else None
    return f"{record.getMessage()} {exc!r}"
