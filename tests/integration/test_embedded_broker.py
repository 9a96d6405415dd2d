"""Smoke test of the demo's embedded amqtt broker with MQTT 3.1.1 connections."""

from __future__ import annotations

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
