"""One MQTT client on an :class:`~fedmpq.mqtt.loop.MqttLoop`, with automatic reconnect:
:class:`Connection`.  Its threading model and sessions are described in :mod:`fedmpq.mqtt`."""

from __future__ import annotations

import enum
import logging
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedmpq.errors import ConfigError, PayloadTooLargeError, TransportError
from fedmpq.mqtt import packets
from fedmpq.mqtt.address import BrokerAddress
from fedmpq.mqtt.backoff import ReconnectBackoff
from fedmpq.mqtt.client import Will, new_paho_client, subscription_list
from fedmpq.mqtt.loop import MqttLoop, Timer, call_guarded, logger
from fedmpq.mqtt.outbox import Message, Outbox

MessageHandler = Callable[["Connection", str, bytes], None]
ConnectHandler = Callable[["Connection"], None]


class _State(enum.Enum):
    IDLE = "idle"  # connect() not called yet
    CONNECTING = "connecting"  # a worker is running paho's blocking connect
    HANDSHAKE = "handshake"  # socket watched, waiting for CONNACK
    SUBSCRIBING = "subscribing"  # CONNACK received, waiting for the SUBACK of the restore
    UP = "up"
    DOWN = "down"  # waiting for the reconnect timer
    CLOSED = "closed"


class Connection:
    """One MQTT client (one client id) on an :class:`MqttLoop`, with automatic reconnect.

    Parameters
    ----------
    loop
        The loop serving this connection.
    broker
        Where to connect.
    client_id
        MQTT client id; unique per broker.
    on_message
        ``on_message(connection, topic, payload)``, called on the loop thread for every
        message on a subscribed topic.  Keep it short: hand heavy work to another thread.
    on_connect
        ``on_connect(connection)``, called on the loop thread after every (re)connect,
        once the remembered subscriptions are active and just before :attr:`connected`
        is set.  It may publish, but must not wait for anything the loop has to do.
    will
        ``(topic, payload, qos, retain)`` the broker publishes if the connection drops
        without a DISCONNECT, or a function returning it, called on the loop thread
        before every connection attempt (a will that differs per connection).
    protocol
        ``"5"`` (default) or ``"3.1.1"``.
    keepalive
        Seconds between pings when idle; a broker silent for as long is considered gone.
    max_payload
        Largest payload :meth:`publish` accepts, in bytes (``None``: no limit of ours).
    session_expiry
        MQTT 5: seconds the broker keeps the session (subscriptions, queued QoS 1
        messages) after a disconnect.
    """

    def __init__(
        self,
        loop: MqttLoop,
        broker: BrokerAddress,
        client_id: str,
        *,
        on_message: MessageHandler,
        on_connect: ConnectHandler | None = None,
        will: Will | Callable[[], Will] | None = None,
        protocol: packets.Protocol = "5",
        keepalive: int = 30,
        max_payload: int | None = None,
        session_expiry: int = 300,
    ) -> None:
        if protocol not in ("5", "3.1.1"):
            raise ConfigError(f"unknown MQTT protocol {protocol!r}: use '5' or '3.1.1'")
        if keepalive < 1:
            raise ConfigError(f"keepalive must be at least 1 s, got {keepalive}")
        if max_payload is not None and max_payload < 1:
            raise ConfigError(f"max_payload must be positive, got {max_payload}")
        self._loop = loop
        self._broker = broker
        self._client_id = client_id
        self._protocol: packets.Protocol = protocol
        self._user_on_message = on_message
        self._user_on_connect = on_connect
        self._max_payload = max_payload
        self._broker_max_packet: int | None = None
        self._v5 = protocol == "5"

        self._state = _State.IDLE
        self._closing = False
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._backoff = ReconnectBackoff()  # its first failure is a warning, later ones info
        self._timer: Timer | None = None
        self._subscriptions: dict[str, int] = {}
        self._no_local: set[str] = set()
        self._outbox = Outbox()
        self._sub_requests: dict[int, list[str]] = {}
        self._restore_mid: int | None = None
        self._will_factory = will if callable(will) else None

        self._client = new_paho_client(
            broker,
            client_id,
            protocol=protocol,
            keepalive=keepalive,
            session_expiry=session_expiry,
            will=None if callable(will) else will,
        )
        self._bind_callbacks(self._client)

    def _bind_callbacks(self, client: paho.Client) -> None:
        client.on_connect = self._on_connack
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_suback
        client.on_publish = self._on_puback
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    # -- public API (any thread) ---------------------------------------------------

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self._client_id

    @property
    def connected(self) -> threading.Event:
        """Set while connected with the remembered subscriptions active."""
        return self._connected

    @property
    def broker_max_packet_size(self) -> int | None:
        """Maximum Packet Size from the broker's last MQTT 5 CONNACK, or None if unlimited
        or not yet known."""
        return self._broker_max_packet

    def connect(self) -> None:
        """Start connecting; return at once.

        Reconnects forever, with exponential backoff (0.5 s doubling to 30 s, with
        jitter), until :meth:`close`.  Calling it again has no effect.
        """
        self._loop.call_soon(self._start)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected (subscriptions active); False if ``timeout`` s passed."""
        return self._connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1, *, no_local: bool = False) -> None:
        """Subscribe to a topic filter, now if connected and again on every reconnect.

        Subscriptions made before :meth:`connect` are active once :attr:`connected` is
        set; later ones become active a round trip after the call.  ``no_local``: not
        the messages this connection publishes itself (MQTT 5; 3.1.1 has no such option).
        """
        packets.check_topic_filter(topic)
        packets.check_qos(qos)
        if no_local:
            self._no_local.add(topic)
        self._loop.call_soon(lambda: self._subscribe(topic, qos))

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription made with :meth:`subscribe` (now, and on reconnects)."""
        self._loop.call_soon(lambda: self._unsubscribe(topic))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; it is sent now if connected, else after the next connect.

        Thread-safe.  Messages published from one thread are sent in order.  While
        disconnected, messages wait in memory (without bound) for the next connect.

        Raises
        ------
        PayloadTooLargeError
            Before anything is sent, if the payload exceeds ``max_payload`` or the PUBLISH
            packet exceeds the broker's Maximum Packet Size (MQTT 5 only: an MQTT 3.1.1
            broker announces none and drops the connection instead).
        TransportError
            If the connection was closed.
        """
        packets.check_publish_topic(topic)
        packets.check_qos(qos)
        self._check_size(topic, len(payload), qos)
        if self._closing:
            raise TransportError(f"{self._client_id}: publish on a closed connection")
        message = (topic, bytes(payload), qos, retain)
        self._loop.call_soon(lambda: self._publish(message))

    def flush(self, timeout: float) -> bool:
        """Wait until every QoS 1 message published so far is acknowledged by the broker.

        Returns False if ``timeout`` s passed first (e.g. the broker is unreachable).
        Must not be called on the loop thread.
        """
        deadline = time.monotonic() + timeout
        queued = threading.Event()
        self._loop.call_soon(queued.set)  # publishes queued before this call have now run
        if not queued.wait(timeout):
            return False
        return self._outbox.idle.wait(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and stop reconnecting.

        Waits up to ``timeout`` s for the DISCONNECT to be sent, except on the loop thread.
        """
        if self._closed.is_set():
            return
        self._closing = True
        try:
            self._loop.call_soon(self._close_on_loop)
        except TransportError:
            self._finish_close()  # the loop has stopped: nothing left to disconnect
            return
        if not self._loop.in_loop_thread():
            self._closed.wait(timeout)

    # -- loop thread -------------------------------------------------------------

    def _check_size(self, topic: str, payload_len: int, qos: int) -> None:
        packets.check_publish_size(
            self._client_id,
            self._broker,
            topic,
            payload_len,
            qos,
            protocol=self._protocol,
            max_payload=self._max_payload,
            broker_max_packet=self._broker_max_packet,
        )

    def _start(self) -> None:
        if self._state is not _State.IDLE or self._closing:
            return
        self._loop._connections.add(self)
        self._attempt()

    def _attempt(self) -> None:
        self._timer = None
        self._state = _State.CONNECTING
        if self._will_factory is not None:
            self._client.will_set(*self._will_factory())
        logger.debug("%s: connecting to %s", self._client_id, self._broker.url)
        self._loop._run_blocking(self._client.reconnect, self._attempt_done)

    def _attempt_done(self, exc: BaseException | None) -> None:
        if exc is not None:
            self._state = _State.DOWN
            if self._closing:
                self._finish_close()
            else:
                self._schedule_reconnect(f"connect failed: {exc}")
            return
        self._state = _State.HANDSHAKE
        self._loop._watch(self._client.socket(), self, self._client.want_write())
        if self._closing:
            self._client.disconnect()

    def _schedule_reconnect(self, reason: str) -> None:
        delay = self._backoff.next_delay()
        level = logging.WARNING if self._backoff.failures == 1 else logging.INFO
        logger.log(
            level,
            "%s: %s (%s); reconnecting in %.1f s",
            self._client_id,
            reason,
            self._broker.url,
            delay,
        )
        self._timer = self._loop._call_later(delay, self._attempt)

    def _on_ready(self, sock: Any, mask: int) -> None:
        client = self._client
        if client.socket() is not sock:
            return  # closed earlier in this pass
        if mask & selectors.EVENT_READ:
            client.loop_read()
            # TLS may hold decrypted bytes the selector cannot see.
            while client.socket() is sock and getattr(sock, "pending", lambda: 0)() > 0:
                client.loop_read()
        if mask & selectors.EVENT_WRITE and client.socket() is sock:
            client.loop_write()

    def _misc(self) -> None:
        self._client.loop_misc()

    def _subscribe(self, topic: str, qos: int) -> None:
        self._subscriptions[topic] = qos
        if self._state in (_State.SUBSCRIBING, _State.UP):
            self._send_subscribe([topic])

    def _unsubscribe(self, topic: str) -> None:
        if self._subscriptions.pop(topic, None) is not None and self._state in (
            _State.SUBSCRIBING,
            _State.UP,
        ):
            self._client.unsubscribe(topic)

    def _send_subscribe(self, topics: list[str]) -> int | None:
        wanted = subscription_list(topics, self._subscriptions, self._no_local, self._v5)
        rc, mid = self._client.subscribe(wanted)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            logger.error("%s: SUBSCRIBE to %s failed: %s", self._client_id, topics, rc)
            return None
        self._sub_requests[mid] = topics
        return mid

    def _publish(self, message: Message) -> None:
        if self._state is _State.UP:
            self._publish_now(message)
        elif self._state is _State.CLOSED:
            logger.warning("%s: dropped message on %s: closed", self._client_id, message[0])
        else:
            self._outbox.hold(message)

    def _publish_now(self, message: Message) -> None:
        topic, payload, qos, retain = message
        try:
            # The broker may announce a smaller limit after a reconnect.
            self._check_size(topic, len(payload), qos)
        except PayloadTooLargeError as exc:
            logger.error("dropped queued message: %s", exc)
            return
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            logger.error("%s: PUBLISH on %s failed: %s", self._client_id, topic, info.rc)
        elif qos > 0:
            self._outbox.sent(info.mid)
        self._outbox.update_idle()

    def _on_puback(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._outbox.acked(mid)

    def _close_on_loop(self) -> None:
        self._closing = True
        if self._state in (_State.IDLE, _State.DOWN):
            if self._timer is not None:
                self._timer.cancelled = True
            self._finish_close()
        elif self._state in (_State.HANDSHAKE, _State.SUBSCRIBING, _State.UP):
            properties = None
            if self._v5:
                # End the session on the broker too: nothing should queue for us any more.
                properties = Properties(PacketTypes.DISCONNECT)
                properties.SessionExpiryInterval = 0
            self._client.disconnect(properties=properties)
        # CONNECTING: _attempt_done sees _closing.

    def _finish_close(self) -> None:
        if self._state is not _State.CLOSED:
            logger.info("%s: closed", self._client_id)
        self._state = _State.CLOSED
        self._connected.clear()
        self._loop._connections.discard(self)
        self._closed.set()

    def _become_ready(self) -> None:
        self._state = _State.UP
        for message in self._outbox.take_held():
            self._publish_now(message)
        self._outbox.update_idle()
        if self._user_on_connect is not None:
            call_guarded(self._user_on_connect, self)
        self._connected.set()

    # -- paho callbacks (loop thread) -------------------------------------------

    def _on_connack(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            # The broker closes the socket next; _on_disconnect schedules the retry.
            logger.error(
                "%s: %s refused the connection: %s (reason code %d)",
                self._client_id,
                self._broker.url,
                reason,
                reason.value,
            )
            return
        self._backoff.reset()
        self._broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        logger.info(
            "%s: connected to %s (MQTT %s, session present: %s, max packet: %s)",
            self._client_id,
            self._broker.url,
            self._protocol,
            flags.session_present,
            self._broker_max_packet or "unlimited",
        )
        self._state = _State.SUBSCRIBING
        if self._subscriptions:
            self._restore_mid = self._send_subscribe(list(self._subscriptions))
        if self._restore_mid is None:
            self._become_ready()

    def _on_suback(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties,
    ) -> None:
        topics = self._sub_requests.pop(mid, [])
        for topic, reason in zip(topics, reasons, strict=False):
            if reason.is_failure:
                logger.error(
                    "%s: %s refused the subscription to %s: %s",
                    self._client_id,
                    self._broker.url,
                    topic,
                    reason,
                )
        if mid == self._restore_mid:
            self._restore_mid = None
            self._become_ready()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._state not in (_State.HANDSHAKE, _State.SUBSCRIBING, _State.UP):
            return  # already handled
        self._connected.clear()
        self._restore_mid = None
        self._sub_requests.clear()
        if self._closing:
            self._finish_close()
            return
        self._state = _State.DOWN
        if flags.is_disconnect_packet_from_server:
            what = f"broker sent DISCONNECT: {reason} (reason code {reason.value})"
        else:
            # paho maps its local error to a reason code: 128 (Unspecified error) for a
            # socket error or EOF, 141 (Keep alive timeout) for a silent broker.
            what = f"connection lost: {reason} (reason code {reason.value})"
        self._schedule_reconnect(what)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        topic = "?"
        try:
            topic = msg.topic
            self._user_on_message(self, topic, bytes(msg.payload))
        except Exception:
            logger.exception("%s: on_message failed for a message on %s", self._client_id, topic)

    def _on_socket_close(self, client: paho.Client, userdata: object, sock: Any) -> None:
        # Off the loop thread (a connect worker) the socket was never watched.
        if self._loop.in_loop_thread():
            self._loop._unwatch(sock)

    def _on_register_write(self, client: paho.Client, userdata: object, sock: Any) -> None:
        # Called on a connect worker while CONNECT is queued: _attempt_done registers then.
        if self._loop.in_loop_thread():
            self._loop._set_write(sock, True)

    def _on_unregister_write(self, client: paho.Client, userdata: object, sock: Any) -> None:
        if self._loop.in_loop_thread():
            self._loop._set_write(sock, False)
