"""Local MQTT brokers: an embedded amqtt broker for the one-command demo, and a
mosquitto subprocess for the tests and the demo's ``--broker mosquitto``.

Both listen on one host (127.0.0.1 by default) and a free port unless told one, keep
that port across :meth:`~LocalBroker.stop` and :meth:`~LocalBroker.start` (so clients
can reconnect to a restarted broker), and are context managers.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedmpq.errors import ConfigError, TransportError
from fedmpq.mqtt import BrokerAddress

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
# Interval between TCP connect probes while a broker starts.
_PROBE_INTERVAL = 0.02
_MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago.

    Another process may take it before the broker binds it; brokers that chose the
    port themselves retry with a new one.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_accepting(host: str, port: int, failure: Callable[[], str | None]) -> None:
    """Poll a TCP connect until it succeeds, ``failure()`` reports why it never will, or
    the start timeout passes."""
    deadline = time.monotonic() + _START_TIMEOUT
    waiter = threading.Event()  # never set: wait() is the poll interval
    while True:
        problem = failure()
        if problem is not None:
            raise TransportError(f"broker on {host}:{port} failed to start: {problem}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"broker on {host}:{port} accepted no connection within "
                    f"{_START_TIMEOUT:.0f} s: {exc}"
                ) from exc
        waiter.wait(_PROBE_INTERVAL)


class LocalBroker(ABC):
    """What the embedded and the mosquitto broker share: address, port choice, context
    manager.  Subclasses implement ``_launch(port)`` and ``_shutdown()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if not 0 <= port < 65536:
            raise ConfigError(f"broker port {port} is out of range: use 0 (any) or 1..65535")
        self.host = host
        self._requested_port = port
        self._port = port
        self._running = False

    @property
    def port(self) -> int:
        """The port the broker listens on (chosen at the first start when 0 was asked)."""
        if self._port == 0:
            raise TransportError("the broker has not been started: its port is not chosen yet")
        return self._port

    @property
    def address(self) -> BrokerAddress:
        """The broker's address for :class:`fedmpq.mqtt.Connection`."""
        return BrokerAddress(self.host, self.port)

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return self.address.url

    def start(self) -> None:
        """Start the broker and return once it accepts TCP connections.

        Raises
        ------
        TransportError
            If it did not start (its output is in the message).
        """
        if self._running:
            return
        # Only a port we picked ourselves may be lost to a race with another process.
        attempts = 3 if self._port == 0 else 1
        for attempt in range(attempts):
            port = self._port or free_port(self.host)
            try:
                self._launch(port)
            except TransportError:
                self._shutdown()
                if attempt == attempts - 1:
                    raise
                continue
            self._port = port
            self._running = True
            return

    def stop(self) -> None:
        """Stop the broker; its port stays reserved for a later :meth:`start`."""
        if self._running:
            self._running = False
            self._shutdown()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @abstractmethod
    def _launch(self, port: int) -> None:
        """Start the broker on ``port``; return once it accepts connections."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Stop whatever ``_launch`` started, even if it failed half-way."""


class EmbeddedBroker(LocalBroker):
    """An amqtt broker (MQTT 3.1.1 only) running in a background thread with its own
    asyncio loop.

    Needs the ``demo`` extra (``pip install fedmpq[demo]``).  amqtt sets no message size
    limit, so multi-megabyte models pass.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._thread: threading.Thread | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    def _launch(self, port: int) -> None:
        broker_class = _import_amqtt_broker()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
            # Only authentication: amqtt's default packet logger and $SYS plugin cost time
            # on every message and add nothing here.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(
            target=asyncio.run,
            args=(self._serve(broker_class, config, ready),),
            name=f"fedmpq-amqtt-{port}",
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise TransportError(f"embedded broker did not start within {_START_TIMEOUT:.0f} s")
        _wait_accepting(self.host, port, self._failure)

    def _failure(self) -> str | None:
        if self._error is not None:
            return f"{type(self._error).__name__}: {self._error}"
        if self._thread is None or not self._thread.is_alive():
            return "the broker thread ended"
        return None

    async def _serve(
        self, broker_class: Any, config: dict[str, Any], ready: threading.Event
    ) -> None:
        self._aloop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            broker = broker_class(config)
            _snapshot_iteration(broker)
            await broker.start()
        except Exception as exc:
            self._error = exc
            return
        finally:
            ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await broker.shutdown()

    def _shutdown(self) -> None:
        thread, aloop, stop_event = self._thread, self._aloop, self._stop_event
        if thread is None:
            return
        if aloop is not None and stop_event is not None and thread.is_alive():
            aloop.call_soon_threadsafe(stop_event.set)
        thread.join(_STOP_TIMEOUT)
        self._thread = self._aloop = self._stop_event = None


class SnapshotDict(dict[Any, Any]):
    """A dict whose iteration walks a copy of its keys or items.

    amqtt 0.12 awaits inside ``for topic in self._subscriptions`` while a device
    connects, so devices subscribing meanwhile (a fleet starting) raised
    ``RuntimeError: dictionary changed size during iteration``: the connecting device was
    dropped and reconnected, re-sending what it had sent.  Iterating over a snapshot lets
    the loop finish; entries added meanwhile are seen by the next walk.
    """

    def __iter__(self) -> Iterator[Any]:
        return iter(list(dict.keys(self)))

    def keys(self) -> list[Any]:  # type: ignore[override]
        return list(dict.keys(self))

    def values(self) -> list[Any]:  # type: ignore[override]
        return list(dict.values(self))

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        return list(dict.items(self))


#: amqtt broker attributes iterated across ``await`` points (see SnapshotDict).
_AMQTT_SHARED_DICTS = ("_subscriptions", "_sessions", "_retained_messages")


def _snapshot_iteration(broker: Any) -> None:
    for name in _AMQTT_SHARED_DICTS:
        current = getattr(broker, name, None)
        if not isinstance(current, dict):
            raise TransportError(
                f"amqtt's Broker has no dict {name!r}: this amqtt version is not supported "
                "by the embedded broker; install the pinned one (pip install fedmpq[demo])"
            )
        setattr(broker, name, SnapshotDict(current))


def _import_amqtt_broker() -> Any:
    # amqtt logs every session transition, and a warning for each readiness probe that
    # connects without speaking MQTT; the demo's output is for the run, not the broker.
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise ConfigError(
            "the embedded MQTT broker needs amqtt: pip install fedmpq[demo] "
            "(or point --broker at a running broker)"
        ) from exc
    return Broker


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (``/usr/sbin/mosquitto`` or on PATH), or None."""
    for candidate in _MOSQUITTO_PATHS:
        found = shutil.which(candidate)
        if found is not None:
            return found
    return None


class MosquittoBroker(LocalBroker):
    """A mosquitto subprocess with a generated config in a temporary directory.

    Parameters
    ----------
    host, port
        Where it listens; port 0 picks a free one at the first start.
    extra_config
        Lines appended to the config, e.g. ``["max_packet_size 10000"]`` or auth/ACL
        settings.  The config already holds ``listener``, ``allow_anonymous true`` and
        ``persistence false``; a later ``allow_anonymous false`` wins.
    binary
        Path of the mosquitto executable; default :func:`find_mosquitto`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        extra_config: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        super().__init__(host, port)
        self.extra_config = list(extra_config)
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running mosquitto (for measuring it), or None if stopped."""
        return None if self._process is None else self._process.pid

    @property
    def log(self) -> str:
        """What mosquitto printed since its last start (for test failure messages)."""
        if self._dir is None:
            return ""
        return (self._dir / "mosquitto.log").read_text(errors="replace")

    def _launch(self, port: int) -> None:
        binary = self._binary or find_mosquitto()
        if binary is None:
            raise ConfigError(
                "mosquitto not found: install it (apt-get install mosquitto) or pass binary="
            )
        self._dir = Path(tempfile.mkdtemp(prefix="fedmpq-mosquitto-"))
        config = self._dir / "mosquitto.conf"
        config.write_text(
            "\n".join(
                [
                    f"listener {port} {self.host}",
                    "allow_anonymous true",
                    "persistence false",
                    "log_dest stderr",
                    *self.extra_config,
                    "",
                ]
            )
        )
        with open(self._dir / "mosquitto.log", "wb") as log:
            try:
                self._process = subprocess.Popen(
                    [binary, "-c", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                raise TransportError(f"cannot run {binary}: {exc}") from exc
        _wait_accepting(self.host, port, self._failure)

    def _failure(self) -> str | None:
        if self._process is None or self._process.poll() is None:
            return None
        return f"mosquitto exited with code {self._process.returncode}:\n{self.log}"

    def _shutdown(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
