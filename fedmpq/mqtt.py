"""Many MQTT connections in one process, served by one selector thread.

paho's threaded ``loop_start()`` gives every client a thread and waits on ``select()``,
which cannot watch file descriptors >= 1024: one process with a few hundred such
clients stops connecting, silently.  Here every client runs on paho's external-loop
API, driven by one :class:`MqttLoop` (a ``selectors.DefaultSelector``, epoll on Linux,
in one thread), whether the process hosts one device, the coordinator or a thousand
emulated devices.

Threading model
---------------
* Every call into a paho client happens on the loop thread.  :meth:`Connection.publish`,
  :meth:`Connection.subscribe` and :meth:`Connection.close` may be called from any
  thread: they hand the work to the loop with :meth:`MqttLoop.call_soon`.
* paho's connect is a blocking TCP connect (and TLS handshake), so connection attempts
  run on a small worker pool; the loop keeps serving the other clients meanwhile.
* ``on_message`` and ``on_connect`` callbacks run on the loop thread.  They must return
  quickly -- hand decoding, training or aggregation to another thread -- or every
  connection of the process stalls.  An exception they raise is logged and dropped.

Sessions
--------
MQTT 5 (the default) connects with clean start on a connection's first connect and
resumes the session on reconnects, with a session expiry interval, so QoS 1 messages
sent to a client during a short disconnect are delivered when it comes back.  MQTT 3.1.1
(for brokers such as amqtt that speak nothing else) always starts a clean session:
messages sent to a client while it is away are lost.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedmpq.errors import ConfigError, PayloadTooLargeError, TransportError

logger = logging.getLogger("fedmpq.mqtt")

Protocol = Literal["5", "3.1.1"]
MessageHandler = Callable[["Connection", str, bytes], None]
ConnectHandler = Callable[["Connection"], None]
#: A last will: ``(topic, payload, qos, retain)``.
Will = tuple[str, bytes, int, bool]

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Query keys of an mqtts:// URL: its CA file, client certificate and key.
_TLS_QUERY = ("ca", "cert", "key")
# loop_misc (keepalive pings, CONNACK/PINGRESP timeouts) needs a tick at least this often.
_MISC_INTERVAL = 1.0
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
# Bounds how long one attempt can hold a connect worker when the broker is unreachable.
_CONNECT_TIMEOUT = 5.0
# MQTT's own ceiling: a 4-byte remaining length (268,435,455) plus the fixed header.
_MQTT_MAX_PACKET = 1 + 4 + 0x0FFFFFFF


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens and how to authenticate to it.

    ``password`` is left out of ``repr`` and of :attr:`url` so addresses can be logged.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("broker address has no host")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port {self.port} is out of range: use 1..65535")
        if self.password is not None and self.username is None:
            raise ConfigError("broker password given without a username")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("broker TLS key file given without a client certificate file")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ConfigError("TLS files given for a plain mqtt:// broker: use mqtts://")

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...[?ca=FILE]``.

        Parameters
        ----------
        url
            Broker URL; the port defaults to 1883 (mqtt) or 8883 (mqtts), user name and
            password may be percent-encoded, IPv6 hosts go in brackets.  An ``mqtts://``
            URL may name its TLS files in the query: ``ca`` (the CA that signed the
            broker's certificate; default: the system's CAs), ``cert`` and ``key`` (a
            client certificate, for a broker that requires one), so one string (e.g.
            ``$FEDMPQ_BROKER``) says everything about the connection.

        Returns
        -------
        BrokerAddress

        Raises
        ------
        ConfigError
            If the URL has another scheme, no host, a bad port, a path or fragment, or a
            query other than the TLS files of an ``mqtts://`` URL.
        """
        hint = "expected mqtt://[user[:password]@]host[:port] or mqtts://...[?ca=FILE]"
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"invalid broker URL {url!r}: {exc}; {hint}") from exc
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"invalid broker URL {url!r}: unknown scheme {scheme!r}; {hint}")
        if not parts.hostname:
            raise ConfigError(f"invalid broker URL {url!r}: no host; {hint}")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"invalid broker URL {url!r}: unexpected path; {hint}")
        files = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(files) - set(_TLS_QUERY))
        if unknown or any(len(v) != 1 or not v[0] for v in files.values()):
            raise ConfigError(
                f"invalid broker URL {url!r}: the query may name {', '.join(_TLS_QUERY)} "
                f"once each, with a file; {hint}"
            )
        if parts.query and not files:
            raise ConfigError(f"invalid broker URL {url!r}: unexpected query; {hint}")
        return cls(
            host=parts.hostname,
            port=_DEFAULT_PORTS[scheme] if port is None else port,
            tls=scheme == "mqtts",
            username=None if parts.username is None else unquote(parts.username),
            password=None if parts.password is None else unquote(parts.password),
            ca_file=files.get("ca", [None])[0],
            cert_file=files.get("cert", [None])[0],
            key_file=files.get("key", [None])[0],
        )

    @property
    def url(self) -> str:
        """The address as a URL, without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


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


class _Timer:
    __slots__ = ("cancelled", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False


class MqttLoop:
    """One selector thread serving many paho clients.

    Parameters
    ----------
    name
        Name of the loop thread (shows in logs and debuggers).
    connect_workers
        Threads that run blocking TCP connects and TLS handshakes.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, name: str = "fedmpq-mqtt", *, connect_workers: int = 4) -> None:
        if connect_workers < 1:
            raise ConfigError(f"connect_workers must be at least 1, got {connect_workers}")
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._callbacks: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._timer_seq = itertools.count()
        self._executor = ThreadPoolExecutor(connect_workers, thread_name_prefix=f"{name}-connect")
        self._connections: set[Connection] = set()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._finished = False

    def __enter__(self) -> MqttLoop:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the loop thread.

        Raises
        ------
        TransportError
            If the loop was already started (a stopped loop cannot be restarted).
        """
        if self._thread is not None:
            raise TransportError("MqttLoop.start() called twice: create a new MqttLoop instead")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection (sending DISCONNECT where possible) and end the thread.

        Parameters
        ----------
        timeout
            Seconds to wait for the thread; connections still open after a grace period
            (a little more than one connect timeout) are dropped without DISCONNECT.
            Called on the loop thread (from a callback), it only starts the shutdown.
        """
        thread = self._thread
        if thread is None or self._finished:
            return
        if self.in_loop_thread():
            self._begin_stop()  # the thread ends once this callback returns and drains
            return
        with contextlib.suppress(TransportError):  # it stopped meanwhile
            self.call_soon(self._begin_stop)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("MQTT loop %s did not stop within %.1f s", self._name, timeout)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread, after the callbacks queued before it.

        Thread-safe; wakes the selector.  An exception ``fn`` raises is logged.

        Raises
        ------
        TransportError
            If the loop has stopped.
        """
        if self._finished:
            raise TransportError(f"MQTT loop {self._name} has stopped")
        self._callbacks.append(fn)
        if not self.in_loop_thread():
            # A full wake-up buffer (BlockingIOError) already guarantees a wake-up.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def in_loop_thread(self) -> bool:
        """Whether the caller runs on the loop thread."""
        return threading.get_ident() == self._thread_id

    # -- used by Connection, on the loop thread ---------------------------------

    def _call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(fn)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), timer))
        return timer

    def _run_blocking(
        self, fn: Callable[[], object], done: Callable[[BaseException | None], None]
    ) -> None:
        def finished(future: Future[object]) -> None:
            exc = future.exception()
            if not self._finished:
                self.call_soon(lambda: done(exc))

        self._executor.submit(fn).add_done_callback(finished)

    def _watch(self, sock: Any, conn: Connection, write: bool) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        # A socket closed behind our back would leave its fd registered; its number may
        # come back for this one, which must win.
        self._unwatch(sock)
        self._selector.register(sock, mask, conn)

    def _set_write(self, sock: Any, write: bool) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return  # not watched (yet): _watch reads want_write() when it registers
        if key.events != mask:
            self._selector.modify(sock, mask, key.data)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        next_misc = time.monotonic() + _MISC_INTERVAL
        try:
            while not (self._stopping and self._drained()):
                now = time.monotonic()
                deadline = min(next_misc, self._timers[0][0]) if self._timers else next_misc
                if self._stopping:
                    deadline = min(deadline, self._stop_deadline)
                timeout = 0.0 if self._callbacks else max(0.0, deadline - now)
                for key, mask in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        _guarded(key.data._on_ready, key.fileobj, mask)
                self._run_callbacks()
                self._run_timers()
                if time.monotonic() >= next_misc:
                    next_misc = time.monotonic() + _MISC_INTERVAL
                    for key in list(self._selector.get_map().values()):
                        if key.data is not None:
                            _guarded(key.data._misc)
        finally:
            self._finished = True
            self._teardown()

    def _drained(self) -> bool:
        return not self._connections or time.monotonic() >= self._stop_deadline

    def _begin_stop(self) -> None:
        self._stopping = True
        self._stop_deadline = time.monotonic() + _CONNECT_TIMEOUT + 1.0
        for conn in list(self._connections):
            conn._close_on_loop()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_callbacks(self) -> None:
        # Only what was queued before this pass: callbacks that queue callbacks must not
        # starve the selector.
        for _ in range(len(self._callbacks)):
            _guarded(self._callbacks.popleft())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                _guarded(timer.fn)

    def _teardown(self) -> None:
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                logger.warning("%s: dropped without DISCONNECT at loop stop", key.data.client_id)
                self._selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
        for conn in list(self._connections):
            conn._finish_close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _guarded(fn: Callable[..., object], *args: object) -> None:
    """Run a callback on the loop thread; log what it raises instead of dying."""
    try:
        fn(*args)
    except Exception:
        logger.exception("error in MQTT loop callback %r", fn)


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
        protocol: Protocol = "5",
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
        self._protocol: Protocol = protocol
        self._user_on_message = on_message
        self._user_on_connect = on_connect
        self._max_payload = max_payload
        self._broker_max_packet: int | None = None
        self._v5 = protocol == "5"

        self._state = _State.IDLE
        self._closing = False
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._backoff = _BACKOFF_FIRST
        self._failures = 0  # consecutive failed attempts; the first one is a warning
        self._timer: _Timer | None = None
        self._subscriptions: dict[str, int] = {}
        self._pending: deque[tuple[str, bytes, int, bool]] = deque()
        self._unacked: set[int] = set()  # mids of QoS 1 PUBLISHes awaiting their PUBACK
        self._idle = threading.Event()  # set while nothing is pending or unacknowledged
        self._idle.set()
        self._sub_requests: dict[int, list[str]] = {}
        self._restore_mid: int | None = None
        self._will_factory = will if callable(will) else None

        self._client = self._make_client(
            keepalive, session_expiry, None if callable(will) else will
        )

    def _make_client(self, keepalive: int, session_expiry: int, will: Will | None) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else True,
            # Reconnects are ours (off the loop thread); paho must not reconnect inline.
            reconnect_on_failure=False,
        )
        client.enable_logger(logging.getLogger("fedmpq.mqtt.paho"))
        client.connect_timeout = _CONNECT_TIMEOUT
        broker = self._broker
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            try:
                client.tls_set(
                    ca_certs=broker.ca_file, certfile=broker.cert_file, keyfile=broker.key_file
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot set up TLS for {broker.url}: {exc}") from exc
        if will is not None:
            client.will_set(*will)
        client.on_connect = self._on_connack
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_suback
        client.on_publish = self._on_puback
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        properties = None
        if self._v5:
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

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe to a topic filter, now if connected and again on every reconnect.

        Subscriptions made before :meth:`connect` are active once :attr:`connected` is
        set; later ones become active a round trip after the call.
        """
        if not topic or "\0" in topic:
            raise ValueError(f"invalid topic filter {topic!r}")
        _check_qos(qos)
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
        if not topic or any(c in topic for c in "+#\0"):
            raise ValueError(f"invalid topic {topic!r}: publish topics hold no wildcards")
        _check_qos(qos)
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
        return self._idle.wait(max(0.0, deadline - time.monotonic()))

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
        if self._max_payload is not None and payload_len > self._max_payload:
            raise PayloadTooLargeError(
                f"{self._client_id}: payload of {payload_len} bytes on {topic} exceeds the "
                f"configured limit of {self._max_payload} bytes; raise max_payload or send less"
            )
        size = publish_packet_size(topic, payload_len, qos, self._protocol)
        if self._broker_max_packet is not None and size > self._broker_max_packet:
            raise PayloadTooLargeError(
                f"{self._client_id}: a {payload_len}-byte payload on {topic} makes a "
                f"{size}-byte PUBLISH packet, over the {self._broker_max_packet}-byte maximum "
                f"packet size of {self._broker.url}; raise the broker's limit "
                "(mosquitto: max_packet_size) or send less"
            )
        if size > _MQTT_MAX_PACKET:
            raise PayloadTooLargeError(
                f"{self._client_id}: a {payload_len}-byte payload on {topic} exceeds MQTT's "
                f"{_MQTT_MAX_PACKET}-byte packet limit; split it"
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
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.INFO
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
        if self._v5:
            # Retained messages only for new subscriptions: resuming a session must not
            # resend a multi-megabyte retained global model on every reconnect.
            options = [
                (t, SubscribeOptions(qos=self._subscriptions[t], retainHandling=1)) for t in topics
            ]
            rc, mid = self._client.subscribe(options)
        else:
            rc, mid = self._client.subscribe([(t, self._subscriptions[t]) for t in topics])
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            logger.error("%s: SUBSCRIBE to %s failed: %s", self._client_id, topics, rc)
            return None
        self._sub_requests[mid] = topics
        return mid

    def _publish(self, message: tuple[str, bytes, int, bool]) -> None:
        if self._state is _State.UP:
            self._publish_now(message)
        elif self._state is _State.CLOSED:
            logger.warning("%s: dropped message on %s: closed", self._client_id, message[0])
        else:
            self._pending.append(message)
            self._idle.clear()

    def _publish_now(self, message: tuple[str, bytes, int, bool]) -> None:
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
            self._unacked.add(info.mid)
        self._update_idle()

    def _update_idle(self) -> None:
        if self._pending or self._unacked:
            self._idle.clear()
        else:
            self._idle.set()

    def _on_puback(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._unacked.discard(mid)
        self._update_idle()

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
        pending, self._pending = self._pending, deque()
        for message in pending:
            self._publish_now(message)
        self._update_idle()
        if self._user_on_connect is not None:
            _guarded(self._user_on_connect, self)
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
        self._backoff = _BACKOFF_FIRST
        self._failures = 0
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


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"invalid QoS {qos!r}: use 0, 1 or 2")
