"""What a PUBLISH or SUBSCRIBE may carry: topics, QoS, and the size limits of a PUBLISH."""

from __future__ import annotations

from typing import Literal

from fedmpq.errors import PayloadTooLargeError
from fedmpq.mqtt.address import BrokerAddress

Protocol = Literal["5", "3.1.1"]

# MQTT's own ceiling: a 4-byte remaining length (268,435,455) plus the fixed header.
MQTT_MAX_PACKET = 1 + 4 + 0x0FFFFFFF


def check_topic_filter(topic: str) -> None:
    """Raise ValueError unless ``topic`` can be subscribed to (wildcards allowed)."""
    if not topic or "\0" in topic:
        raise ValueError(f"invalid topic filter {topic!r}")


def check_publish_topic(topic: str) -> None:
    """Raise ValueError unless ``topic`` can be published to."""
    if not topic or any(c in topic for c in "+#\0"):
        raise ValueError(f"invalid topic {topic!r}: publish topics hold no wildcards")


def check_qos(qos: int) -> None:
    """Raise ValueError unless ``qos`` is an MQTT QoS level."""
    if qos not in (0, 1, 2):
        raise ValueError(f"invalid QoS {qos!r}: use 0, 1 or 2")


def publish_packet_size(topic: str, payload_len: int, qos: int, protocol: Protocol = "5") -> int:
    """Size in bytes of the PUBLISH packet that carries a payload, fixed header included.

    This is what a broker compares with the Maximum Packet Size it announces.

    Parameters
    ----------
    topic, payload_len, qos
        The message: topic name, payload length in bytes, QoS level.
    protocol
        ``"5"`` adds the (empty) properties length byte; ``"3.1.1"`` has none.

    Returns
    -------
    int
    """
    remaining = (
        2 + len(topic.encode("utf-8")) + (2 if qos else 0) + (1 if protocol == "5" else 0)
    ) + payload_len
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def check_publish_size(
    client_id: str,
    broker: BrokerAddress,
    topic: str,
    payload_len: int,
    qos: int,
    *,
    protocol: Protocol,
    max_payload: int | None,
    broker_max_packet: int | None,
) -> None:
    """Refuse a message that is over our limit, the broker's or MQTT's own.

    Parameters
    ----------
    client_id, broker
        The connection that would send it (named in the error).
    topic, payload_len, qos
        The message.
    protocol
        The connection's MQTT version.
    max_payload
        Largest payload we accept, in bytes (``None``: no limit of ours).
    broker_max_packet
        Maximum Packet Size the broker announced (``None``: none known).

    Raises
    ------
    PayloadTooLargeError
        If one of the limits is exceeded.
    """
    if max_payload is not None and payload_len > max_payload:
        raise PayloadTooLargeError(
            f"{client_id}: payload of {payload_len} bytes on {topic} exceeds the "
            f"configured limit of {max_payload} bytes; raise max_payload or send less"
        )
    size = publish_packet_size(topic, payload_len, qos, protocol)
    if broker_max_packet is not None and size > broker_max_packet:
        raise PayloadTooLargeError(
            f"{client_id}: a {payload_len}-byte payload on {topic} makes a "
            f"{size}-byte PUBLISH packet, over the {broker_max_packet}-byte maximum "
            f"packet size of {broker.url}; raise the broker's limit "
            "(mosquitto: max_packet_size) or send less"
        )
    if size > MQTT_MAX_PACKET:
        raise PayloadTooLargeError(
            f"{client_id}: a {payload_len}-byte payload on {topic} exceeds MQTT's "
            f"{MQTT_MAX_PACKET}-byte packet limit; split it"
        )
