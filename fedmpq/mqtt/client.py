"""The paho client behind a connection: protocol, credentials, TLS, last will, session."""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmpq.errors import ConfigError
from fedmpq.mqtt.address import BrokerAddress
from fedmpq.mqtt.loop import CONNECT_TIMEOUT
from fedmpq.mqtt.packets import Protocol

#: A last will: ``(topic, payload, qos, retain)``.
Will = tuple[str, bytes, int, bool]


def new_paho_client(
    broker: BrokerAddress,
    client_id: str,
    *,
    protocol: Protocol,
    keepalive: int,
    session_expiry: int,
    will: Will | None,
) -> paho.Client:
    """A paho client for paho's external-loop API, set up to connect but not connected.

    Parameters
    ----------
    broker, client_id
        Where to connect and as whom.
    protocol, keepalive, session_expiry
        As for :class:`~fedmpq.mqtt.Connection`.
    will
        The last will, or None (none, or one set before every attempt).

    Returns
    -------
    paho.Client
        Without callbacks: the connection binds its own.

    Raises
    ------
    ConfigError
        If the TLS files cannot be loaded.
    """
    v5 = protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else True,
        # Reconnects are ours (off the loop thread); paho must not reconnect inline.
        reconnect_on_failure=False,
    )
    client.enable_logger(logging.getLogger("fedmpq.mqtt.paho"))
    client.connect_timeout = CONNECT_TIMEOUT
    _set_credentials(client, broker)
    if will is not None:
        client.will_set(*will)
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
    # No I/O yet: this only records where and how to connect.
    client.connect_async(
        broker.host,
        broker.port,
        keepalive,
        clean_start=paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )
    return client


def _set_credentials(client: paho.Client, broker: BrokerAddress) -> None:
    """User name, password and TLS files of ``broker``, on ``client``."""
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        try:
            client.tls_set(
                ca_certs=broker.ca_file, certfile=broker.cert_file, keyfile=broker.key_file
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot set up TLS for {broker.url}: {exc}") from exc


def subscription_list(
    topics: list[str], qos: dict[str, int], no_local: set[str], v5: bool
) -> list[Any]:
    """What paho's ``subscribe`` takes for ``topics``: (topic, qos) pairs, or with MQTT 5
    options: no local where asked, and retained messages only for new subscriptions (a
    resumed session must not resend a multi-megabyte retained model on every reconnect)."""
    if not v5:
        return [(t, qos[t]) for t in topics]
    return [
        (t, SubscribeOptions(qos=qos[t], noLocal=t in no_local, retainHandling=1)) for t in topics
    ]
